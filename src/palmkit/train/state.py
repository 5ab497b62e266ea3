"""Training checkpoints: model, optimiser, RNG and data-loader state, written atomically, for an exact resume."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from palmkit.data.shards import MixtureLoader
from palmkit.io import atomic_write_json, load_json, load_tensors, save_tensors, staged_dir
from palmkit.model.checkpoint import CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, write_checkpoint
from palmkit.model.fused import is_fused
from palmkit.model.layouts import fused_state_dict, plain_state_dict
from palmkit.model.palm import PaLM
from palmkit.model.tokenizer import Tokenizer
from palmkit.train.config import TrainConfig
from palmkit.train.distributed import Dist


def _flatten(prefix: str, obj, tensors: dict, meta):
    """Split a nested state into safetensors tensors and a JSON skeleton that points at them."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {str(k): _flatten(f"{prefix}.{k}", v, tensors, meta) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_flatten(f"{prefix}.{i}", v, tensors, meta) for i, v in enumerate(obj)]
    return obj


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict) and "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if isinstance(obj, dict):
        return {k: _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def save_training_state(run: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        loader: MixtureLoader, cfg: TrainConfig, tokenizer: Tokenizer, plain: PaLM, d: Dist,
                        extra: dict) -> Path | None:
    """Write run/checkpoints/step-N atomically (a plain checkpoint plus optimiser, RNG and data state)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)  # collective under FSDP: every rank calls it
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    if not d.is_main:
        return None
    ckpt_root = run / "checkpoints"
    target = ckpt_root / f"step-{step:07d}"
    with torch.device("meta"):
        shell = PaLM(plain.config)
    model_sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model_sd.items()}
    shell.load_state_dict(plain_state_dict(model_sd, plain.config), assign=True)
    with staged_dir(target) as staging:
        write_checkpoint(staging, shell, tokenizer, extra={"train": asdict(cfg), "step": step, **extra})
        tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
        skeleton = _flatten("optim", optim_sd, tensors, None)
        save_tensors(staging / "optimizer.safetensors", tensors)
        atomic_write_json(staging / "trainer_state.json", {"step": step, "optimizer": skeleton,
                                                           "loader": loader.state_dict(), **extra})
    atomic_write_json(run / "latest.json", {"step": step, "path": target.name})
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for p in old[: max(0, len(old) - cfg.keep_last)]:
        shutil.rmtree(p, ignore_errors=True)
    return target


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    latest = run / "latest.json"
    if latest.is_file():
        path = run / "checkpoints" / load_json(latest)["path"]
        if (path / "trainer_state.json").is_file():
            return path
    done = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "trainer_state.json").is_file())
    return done[-1] if done else None


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        loader: MixtureLoader) -> dict:
    """Restore model, optimiser, RNG and loader from a checkpoint; returns trainer_state.json."""
    state = load_json(path / "trainer_state.json")
    tensors = load_tensors(path / "optimizer.safetensors")
    weights = load_tensors(path / "model.safetensors")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if is_fused(model):  # checkpoints hold the plain layout
        weights = fused_state_dict(weights)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, _unflatten(state["optimizer"], tensors), options=options)
    torch.set_rng_state(tensors["rng.torch"])
    loader.load_state_dict(state["loader"])
    return state


def replace_dir_copy(src: Path, dst: Path) -> None:
    """Copy checkpoint `src` to `dst` (model files only), replacing `dst` atomically."""
    with staged_dir(dst) as staging:
        for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE):
            shutil.copyfile(src / name, staging / name)
