"""Model I/O, versioned weight files and crash-safe checkpoints.

Weight files (what the learner publishes for generators and scorers) are
`<weights_dir>/v{version}.safetensors`, one file with Hugging Face parameter
names, written atomically by `tepo_ray.models.tiny.save_weights_safetensors`
(tied tensors cloned, tmp file + `os.replace`).

A checkpoint is a directory `<ckpt_dir>/step_{N}`::

    step_12/
      model/            config.json, model.safetensors, tokenizer files (loadable by from_pretrained)
      optimizer.pt      trainer_state.pt (step, version, RNG states, driver's `extra`)
      scheduler.pt      manifest.json    (every file with its size; written last)

A sharded learner's checkpoint holds `dcp/` (torch.distributed.checkpoint
shards of model and optimizer) and `model_config/` instead of `model/` and
`optimizer.pt` (`tepo_ray.distributed.checkpoint`); `export_model_dir` turns
either kind into a plain Hugging Face model directory.

Commit protocol (`save_checkpoint`): every file is written into
`.tmp-step_{N}-<pid>` in the same parent and fsynced, the manifest is written
and fsynced, the directory is renamed to `step_{N}` (the commit point), the
parent is fsynced, then the `latest` pointer file is replaced atomically and
checkpoints beyond the newest `keep` are deleted. A crash at any point leaves
either the old or the new checkpoint complete. `load_latest` only considers
`step_{N}` directories whose manifest matches the files on disk; a missing,
corrupt or stale `latest` pointer falls back to the newest complete
checkpoint and says so.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from tepo_ray.models.tiny import load_state_from_safetensors, save_weights_safetensors

__all__ = [
    "DTYPES",
    "LoadedCheckpoint",
    "TOKENIZER_FILES",
    "load_policy",
    "is_hub_id",
    "load_weights_into",
    "copy_tokenizer_files",
    "weight_file_path",
    "list_weight_versions",
    "publish_weights",
    "save_model_dir",
    "save_checkpoint",
    "list_checkpoints",
    "checkpoint_problem",
    "load_latest",
    "capture_rng_state",
    "restore_rng_state",
    "fsync_dir",
    "commit_dir",
    "export_model_dir",
]

log = logging.getLogger(__name__)

DTYPES = _DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_WEIGHT_RE = re.compile(r"^v(\d+)\.safetensors$")
_STEP_RE = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp-step_"
LATEST = "latest"
MANIFEST = "manifest.json"
# Files copied next to saved weights so a checkpoint / SFT output is a complete HF model dir.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
    "tepo_tiny.json",
)


# --------------------------------------------------------------------------- model I/O
def load_policy(model_path: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """Load a Hugging Face causal LM onto `device` in `dtype`: a local model directory, or a hub id
    (`Qwen/Qwen2.5-7B-Instruct`) on machines that can reach a hub (or have it in the HF cache)."""
    from transformers import AutoModelForCausalLM

    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; expected one of {sorted(_DTYPES)}")
    path = Path(model_path)
    if not (path / "config.json").is_file():
        if not is_hub_id(str(model_path)):
            raise FileNotFoundError(f"model directory {path} has no config.json; expected a Hugging Face model "
                                    f"dir or a hub id such as Qwen/Qwen2.5-7B-Instruct")
        try:
            model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=_DTYPES[dtype])
        except OSError as exc:
            raise FileNotFoundError(f"model {model_path!r} is not a local directory and could not be loaded as a "
                                    f"hub id ({type(exc).__name__}: {str(exc).splitlines()[0]}); download it "
                                    f"first or point model.path at a local copy") from None
        return model.to(device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_DTYPES[dtype])
    return model.to(device)


def is_hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repo id (`org/name`) and names no local path."""
    if not name or name.startswith((".", "/", "~")) or Path(name).exists():
        return False
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*", name) is not None


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Load weights into `model` in place from a `.safetensors` file or a model directory."""
    path = Path(path)
    if path.is_dir():
        single = path / "model.safetensors"
        if single.is_file():
            load_state_from_safetensors(model, single)
            return
        from transformers import AutoModelForCausalLM

        src = AutoModelForCausalLM.from_pretrained(str(path), dtype=next(model.parameters()).dtype)
        model.load_state_dict(src.state_dict(), strict=True)
        return
    load_state_from_safetensors(model, path)


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer (and generation config) files present in `src_dir` and absent in `dst_dir`."""
    src, dst = Path(src_dir), Path(dst_dir)
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def save_model_dir(model: torch.nn.Module, out_dir: str | os.PathLike, *, tokenizer_from: str | None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) into `out_dir` (not atomic by itself)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(str(out))
    save_weights_safetensors(model, out / "model.safetensors")
    if tokenizer_from is not None:
        copy_tokenizer_files(tokenizer_from, out)
    return out


# --------------------------------------------------------------------------- weight versions
def weight_file_path(weights_dir: str | os.PathLike, version: int) -> Path:
    return Path(weights_dir) / f"v{int(version)}.safetensors"


def list_weight_versions(weights_dir: str | os.PathLike) -> list[int]:
    """Versions with a complete weight file in `weights_dir`, ascending."""
    d = Path(weights_dir)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _WEIGHT_RE.match(p.name)))


def publish_weights(model: torch.nn.Module, *, weights_dir: str | os.PathLike, version: int, keep: int) -> Path:
    """Write `v{version}.safetensors` atomically; delete versions <= version - keep."""
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    path = save_weights_safetensors(model, weight_file_path(weights_dir, version))
    for v in list_weight_versions(weights_dir):
        if v <= version - keep:
            weight_file_path(weights_dir, v).unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------- fsync helpers
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files_under(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): p.stat().st_size
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def commit_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """fsync every file under `tmp`, then rename it to `final` (replacing an existing `final`).

    `tmp` must be in the same parent directory as `final` so the rename is atomic.
    When `final` exists it is first renamed aside (`<tmp>-old`) and deleted after
    the swap, so a reader sees either the old or the new directory under `final`
    except for the instant between the two renames.
    """
    tmp, final = Path(tmp), Path(final)
    if tmp.parent.resolve() != final.parent.resolve():
        raise ValueError(f"{tmp} and {final} must share a parent directory for an atomic rename")
    for p in tmp.rglob("*"):
        if p.is_file():
            _fsync_file(p)
        elif p.is_dir():
            fsync_dir(p)
    fsync_dir(tmp)
    if final.exists():
        trash = tmp.with_name(tmp.name + "-old")
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)
    return final


# --------------------------------------------------------------------------- checkpoints
@dataclass
class LoadedCheckpoint:
    """The checkpoint `load_latest` chose; `note` explains a fallback (None when the pointer was fine)."""

    path: Path
    step: int
    note: str | None = None


def save_checkpoint(
    ckpt_dir: str | os.PathLike,
    *,
    step: int,
    writers: Mapping[str, Callable[[Path], None]],
    keep: int,
    on_file_written: Callable[[str], None] | None = None,
) -> Path:
    """Write a checkpoint atomically and return its final path `<ckpt_dir>/step_{step}`.

    `writers` maps an entry name (file or directory, relative to the checkpoint)
    to a function that writes it at the given path. `on_file_written(name)` is
    called after each entry (a hook for fault injection in tests). An existing
    `step_{step}` is replaced.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(ckpt_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_TMP_PREFIX}*"):  # leftovers of a writer that crashed
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step_{int(step)}"
    final = root / name
    tmp = root / f"{_TMP_PREFIX}{int(step)}-{os.getpid()}"
    tmp.mkdir()
    for entry, write in writers.items():
        write(tmp / entry)
        if on_file_written is not None:
            on_file_written(entry)
    manifest = {"step": int(step), "files": _files_under(tmp)}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
    commit_dir(tmp, final)
    pointer_tmp = root / f"{LATEST}.tmp-{os.getpid()}"
    pointer_tmp.write_text(name + "\n", encoding="utf-8")
    _fsync_file(pointer_tmp)
    os.replace(pointer_tmp, root / LATEST)
    fsync_dir(root)
    for _, old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return f"{path} has no {MANIFEST} (incomplete write)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError) as exc:
        return f"{manifest_path} is unreadable ({exc})"
    for rel, size in files.items():
        p = path / rel
        if not p.is_file():
            return f"{p} listed in the manifest is missing"
        if p.stat().st_size != size:
            return f"{p} has {p.stat().st_size} bytes, the manifest says {size}"
    return None


def list_checkpoints(ckpt_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in `ckpt_dir` as (step, path), ascending by step."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_RE.match(p.name)
        if m and p.is_dir() and checkpoint_problem(p) is None:
            out.append((int(m.group(1)), p))
    return sorted(out)


def load_latest(ckpt_dir: str | os.PathLike) -> LoadedCheckpoint | None:
    """The checkpoint to resume from, or None when `ckpt_dir` holds no complete checkpoint.

    Uses the `latest` pointer when it names a complete checkpoint and no newer
    complete one exists; otherwise falls back to the newest complete checkpoint,
    logs a warning and sets `note`. Temporary directories are never considered.
    """
    root = Path(ckpt_dir)
    complete = list_checkpoints(root)
    if not complete:
        return None
    newest_step, newest = complete[-1]
    pointer = root / LATEST
    note: str | None = None
    try:
        target = pointer.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        note = f"{pointer} is missing"
    except (OSError, UnicodeDecodeError) as exc:
        note = f"{pointer} is unreadable ({exc})"
    else:
        m = _STEP_RE.match(target)
        if m is None:
            note = f"{pointer} holds {target[:40]!r}, not a checkpoint name"
        elif (problem := checkpoint_problem(root / target)) is not None:
            note = f"{pointer} names {target}, which is not usable: {problem}"
        elif int(m.group(1)) < newest_step:
            note = f"{pointer} names {target} but the newer complete checkpoint {newest.name} exists"
        else:
            return LoadedCheckpoint(path=root / target, step=int(m.group(1)))
    note += f"; falling back to the newest complete checkpoint {newest}"
    log.warning(note)
    return LoadedCheckpoint(path=newest, step=newest_step, note=note)


# --------------------------------------------------------------------------- RNG
def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- export
def export_model_dir(step_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str = "float32") -> Path:
    """Write a standard Hugging Face model dir (config.json, model.safetensors, tokenizer) from a checkpoint.

    `step_dir` is a complete checkpoint (`step_N`) of either kind: single-process
    (`model/`) or sharded (`dcp/` + `model_config/`, gathered here in one
    process, whatever world size wrote it). Written to a tmp dir next to
    `out_dir`, then renamed, so `out_dir` is complete or absent.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from tepo_ray.distributed.checkpoint import DCP_DIR, MODEL_CONFIG_DIR, is_sharded_checkpoint, load_dcp

    step_dir, out = Path(step_dir), Path(out_dir)
    if (problem := checkpoint_problem(step_dir)) is not None:
        raise FileNotFoundError(f"cannot export {step_dir}: {problem}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid; expected one of {sorted(_DTYPES)}")
    if is_sharded_checkpoint(step_dir):
        src = step_dir / MODEL_CONFIG_DIR
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(src)), dtype=torch.float32)
        load_dcp(step_dir / DCP_DIR, model=model)
    else:
        src = step_dir / "model"
        model = load_policy(src, dtype="float32")
    model = model.to(_DTYPES[dtype])
    model.config.torch_dtype = _DTYPES[dtype]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_dir(model, tmp, tokenizer_from=str(src))
    commit_dir(tmp, out)
    return out
