"""Checkpoint folders: `model.safetensors`, `config.json`, `tokenizer.model`.

Writes are atomic (temporary file, fsync, rename) so that a crash never leaves a half-written
checkpoint, and loading never unpickles: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from palmkit.errors import PalmkitError
from palmkit.model import ModelConfig, PaLM, rotary_tables
from palmkit.optimize import restore_layout, saved_layout, storable_state
from palmkit.tokenizer import Tokenizer

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.model"


class CheckpointError(PalmkitError):
    """A checkpoint file is missing or unreadable; the message names the file."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Atomically write a safetensors file (tensors made contiguous and unshared)."""
    flat = {k: v.detach().contiguous().clone() if _shares_storage(v) else v.detach().contiguous()
            for k, v in tensors.items()}
    atomic_write_bytes(path, save(flat, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def _shares_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() != t.numel() * t.element_size()


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file raises CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        tensors = load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path}: {exc}") from None
    # A fixed key order: every rank must walk the tensors in the same order to shard them (FSDP2).
    return {k: tensors[k] for k in sorted(tensors)}


def load_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing checkpoint file: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path}: {exc}") from None


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the plain PaLM layout, whatever wrappers (compile, DDP, FSDP2) it wears."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DistributedDataParallel
    # FSDP2 shards parameters as DTensors; full_tensor() gathers them (a collective: call on every rank).
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    # Fused projections are a runtime layout; an int8 embedding is stored once (issue 7).
    return storable_state(model, state)


def save_checkpoint(path: str | os.PathLike, model: PaLM, tokenizer: Tokenizer | str | os.PathLike,
                    extra: dict | None = None) -> Path:
    """Write a checkpoint folder atomically: built beside the target, then renamed into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tok_file = tokenizer.path if isinstance(tokenizer, Tokenizer) else Path(tokenizer)
    staging = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        config = {"model": model.config.to_dict(), **(extra or {})}
        for section, layout in saved_layout(model).items():  # int8 or low-rank layers: how to rebuild them
            config[section] = {**config.get(section, {}), **layout}
        save_tensors(staging / MODEL_FILE, model_state(model), metadata={"format": "pt"})
        atomic_write_json(staging / CONFIG_FILE, config)
        shutil.copyfile(tok_file, staging / TOKENIZER_FILE)
        replace_dir(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def replace_dir(src: Path, dst: Path) -> None:
    """Move folder `src` to `dst`, replacing an existing `dst` with at most a moment where neither exists."""
    old = dst.with_name(f".{dst.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dst.exists():
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_config(path: str | os.PathLike) -> dict:
    """The checkpoint's config.json as a dict (with its `model` section)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    config = load_json(path / CONFIG_FILE)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"corrupt checkpoint file {path / CONFIG_FILE}: no 'model' section")
    return config


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> tuple[PaLM, Tokenizer, dict]:
    """(model in eval mode, tokenizer, config dict) from a checkpoint folder."""
    path = Path(path)
    config = load_config(path)
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {path / CONFIG_FILE}: {exc}") from None
    state = load_tensors(path / MODEL_FILE)
    try:
        tokenizer = Tokenizer(path / TOKENIZER_FILE)
    except (FileNotFoundError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    with torch.device("meta"):
        model = PaLM(cfg)
    state = restore_layout(model, config, state)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"checkpoint {path / MODEL_FILE} does not match its config: {first[-1]}") from None
    model.rope_cos, model.rope_sin = rotary_tables(cfg)
    model.to(device=device, dtype=dtype)
    return model.eval(), tokenizer, config
