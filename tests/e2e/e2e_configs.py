"""Config files of the end-to-end tests: demo.yaml with the tiny overlay (2-layer 128-wide Qwen2)."""

from pathlib import Path

CONFIGS = Path(__file__).resolve().parents[2] / "experiments" / "configs"
CONFIG_FILES = [CONFIGS / "demo.yaml", CONFIGS / "tiny.yaml"]
