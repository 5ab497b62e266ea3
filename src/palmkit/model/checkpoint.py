"""Checkpoint folders: `model.safetensors`, `config.json`, `tokenizer.model`.

Writes are atomic (a folder built beside its target, then swapped in) so that a crash never leaves a half-written
checkpoint, and loading never unpickles: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from palmkit.errors import CheckpointError
from palmkit.io import atomic_copy, atomic_write_json, load_json, load_tensors, save_tensors, staged_dir
from palmkit.model.layouts import model_state, restore_layout, saved_layout
from palmkit.model.palm import ModelConfig, PaLM, rotary_tables
from palmkit.model.tokenizer import Tokenizer

MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.model"
CHECKPOINT_FILES = frozenset({MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE})  # what a folder may hold to be replaced


def save_checkpoint(path: str | os.PathLike, model: PaLM, tokenizer: Tokenizer | str | os.PathLike,
                    extra: dict | None = None, force: bool = False) -> Path:
    """Write a checkpoint folder atomically: built beside the target, then renamed into place.

    An existing folder is replaced only when it holds nothing but checkpoint files; `force` writes into any
    folder, replacing the checkpoint files and keeping the others (palmkit.io.staged_dir)."""
    path = Path(path)
    with staged_dir(path, CHECKPOINT_FILES, force) as staging:
        write_checkpoint(staging, model, tokenizer, extra)
    return path


def write_checkpoint(folder: Path, model: PaLM, tokenizer: Tokenizer | str | os.PathLike,
                     extra: dict | None = None) -> None:
    """Write the checkpoint files into an existing folder (one being staged: see `save_checkpoint`)."""
    tok_file = tokenizer.path if isinstance(tokenizer, Tokenizer) else Path(tokenizer)
    add_bos = tokenizer.add_bos if isinstance(tokenizer, Tokenizer) else True
    config = {"model": model.config.to_dict(), "tokenizer": {"add_bos": add_bos}, **(extra or {})}
    for section, layout in saved_layout(model).items():  # int8 or low-rank layers: how to rebuild them
        config[section] = {**config.get(section, {}), **layout}
    save_tensors(folder / MODEL_FILE, model_state(model), metadata={"format": "pt"})
    atomic_write_json(folder / CONFIG_FILE, config)
    atomic_copy(tok_file, folder / TOKENIZER_FILE)


def load_config(path: str | os.PathLike) -> dict:
    """The checkpoint's config.json as a dict (with its `model` section)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint folder not found: {path}")
    config = load_json(path / CONFIG_FILE, "checkpoint file")
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"corrupt checkpoint file {path / CONFIG_FILE}: no 'model' section")
    return config


# Fine-tuned checkpoints whose output is a head of their own (head.safetensors), which a causal-LM export lacks.
HEAD_TASKS = ("classify", "ner")


def require_language_model(config: dict, checkpoint: str | os.PathLike, target: str, drop_head: bool) -> None:
    """Refuse to export a classify or ner checkpoint to `target` (a causal-LM format) unless `drop_head`."""
    task = config.get("task")
    if task in HEAD_TASKS and not drop_head:
        verb = {"classify": "classify", "ner": "tag"}[task]
        raise CheckpointError(f"{checkpoint} is a {task} checkpoint: its head (head.safetensors) has no place in "
                              f"{target}, so the export would not {verb}; use it with palmkit (palmkit {verb}, "
                              f"serve), or pass --drop_head to export its language model alone")


def bos_rule(config: dict) -> bool:
    """Whether the checkpoint's sequences start with BOS (`tokenizer.add_bos` in config.json). A checkpoint
    written before the rule was recorded says nothing: palmkit prompted and fine-tuned those with BOS, so True."""
    return bool(config.get("tokenizer", {}).get("add_bos", True))


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
        tokenizer = Tokenizer(path / TOKENIZER_FILE, add_bos=bos_rule(config))
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
