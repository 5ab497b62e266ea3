"""Training checkpoints: model, optimiser, RNG, data and loop state, written atomically, for an exact resume.

A checkpoint whose weights are not finite is never written (it would become the latest while older, good ones are
pruned), and a resume falls back, with a warning, to the newest checkpoint that loads when latest.json or the
newest checkpoint is damaged.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from palmkit.errors import CheckpointError, PalmkitError
from palmkit.io import (
    atomic_copy,
    atomic_write_json,
    foreign_entries,
    load_json,
    load_tensors,
    save_tensors,
    staged_dir,
    warn,
)
from palmkit.model.checkpoint import CHECKPOINT_FILES, CONFIG_FILE, MODEL_FILE, TOKENIZER_FILE, write_checkpoint
from palmkit.model.fused import is_fused
from palmkit.model.layouts import fused_state_dict, plain_state_dict
from palmkit.model.palm import PaLM
from palmkit.model.tokenizer import Tokenizer
from palmkit.train.distributed import Dist, all_reduce, gather_objects

OPTIMIZER_FILE, TRAINER_FILE = "optimizer.safetensors", "trainer_state.json"
STEP_FILES = CHECKPOINT_FILES | {OPTIMIZER_FILE, TRAINER_FILE}  # what run/checkpoints/step-N holds


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


def _rng_state(d: Dist) -> dict[str, torch.Tensor]:
    state = {"torch": torch.get_rng_state()}
    if d.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(d.device)
    return state


def plain_weights(plain: PaLM, tokenizer: Tokenizer, extra: dict) -> Callable[[Path, dict], None]:
    """A weights writer (see save_training_state) that makes the step folder a plain checkpoint of `plain`."""
    def write(staging: Path, model_sd: dict) -> None:
        with torch.device("meta"):
            shell = PaLM(plain.config)
        shell.load_state_dict(plain_state_dict(model_sd, plain.config), assign=True)
        write_checkpoint(staging, shell, tokenizer, extra=extra)
    return write


def read_plain_weights(path: Path, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights of a plain step folder in `model`'s layout (checkpoints hold the plain one)."""
    weights = load_tensors(path / MODEL_FILE)
    return fused_state_dict(weights) if is_fused(model) else weights


def save_training_state(run: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist,
                        keep_last: int, write_weights: Callable[[Path, dict], None], state: dict,
                        files: frozenset[str] | set[str] = STEP_FILES) -> Path | None:
    """Write run/checkpoints/step-N atomically: the weights (`write_weights(folder, full state dict)`), the
    optimiser, every rank's RNG and `state` (JSON: data position, loop and engine state) in trainer_state.json.

    `files` names what a step folder holds (only such folders are pruned to the newest `keep_last`)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)  # collective under FSDP: every rank calls it
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options)
    rngs = gather_objects(_rng_state(d), d)  # dropout draws differ by rank: each rank's stream is resumed
    # The full weights are on the main rank only; every rank learns the verdict, so that all of them stop together.
    bad = [k for k, v in model_sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if all_reduce([float(len(bad))], d)[0] and not d.is_main:
        raise PalmkitError(f"the weights at step {step} are not finite: not saved (see the main rank's message)")
    if not d.is_main:
        return None
    ckpt_root = run / "checkpoints"
    if bad:
        newest = latest_checkpoint(run)
        raise PalmkitError(f"the weights at step {step} are not finite ({len(bad)} tensors, e.g. {bad[0]}): not "
                           f"saved, {'the latest checkpoint stays ' + newest.name if newest else 'no checkpoint'}"
                           "; lower --train.lr, raise --train.warmup_steps or train in --train.dtype float32")
    target = ckpt_root / f"step-{step:07d}"
    model_sd = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in model_sd.items()}
    with staged_dir(target, files) as staging:
        write_weights(staging, model_sd)
        tensors: dict[str, torch.Tensor] = {f"rng.{kind}.{r}": t for r, rng in enumerate(rngs)
                                            for kind, t in rng.items()}
        skeleton = _flatten("optim", optim_sd, tensors, None)
        save_tensors(staging / OPTIMIZER_FILE, tensors)
        atomic_write_json(staging / TRAINER_FILE, {"step": step, "optimizer": skeleton, **state})
    atomic_write_json(run / "latest.json", {"step": step, "path": target.name})
    # The oldest go; folders of later steps (left by a run resumed from an earlier checkpoint) are replaced as the
    # run reaches them. Only folders that hold nothing but a checkpoint's files are pruned.
    old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.name < target.name)
    for p in old[: max(0, len(old) + 1 - keep_last)]:
        if not foreign_entries(p, files):
            shutil.rmtree(p, ignore_errors=True)
    return target


def _step_folders(run: Path) -> list[Path]:
    return sorted((p for p in (run / "checkpoints").glob("step-*") if (p / TRAINER_FILE).is_file()), reverse=True)


def checkpoint_candidates(run: Path) -> list[Path]:
    """The run's complete checkpoints, best first: the one latest.json names, then the others newest first.

    A latest.json that cannot be read, or that names a missing checkpoint, is reported and passed over."""
    latest, first = run / "latest.json", []
    if latest.is_file():
        try:
            path = run / "checkpoints" / str(load_json(latest, "latest-checkpoint pointer")["path"])
            if not (path / TRAINER_FILE).is_file():
                raise CheckpointError(f"{latest} names {path.name}, which is missing or incomplete")
            first = [path]
        except (CheckpointError, KeyError, TypeError) as exc:
            warn(f"{exc if isinstance(exc, CheckpointError) else f'corrupt checkpoint file {latest}'}: "
                 "using the newest complete checkpoint instead")
    return first + [p for p in _step_folders(run) if p not in first]


def latest_checkpoint(run: Path) -> Path | None:
    """The newest complete checkpoint of a run (the one latest.json names, when it can be read), or None."""
    found = checkpoint_candidates(run)
    return found[0] if found else None


def resume_training_state(run: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist,
                          read_weights: Callable[[Path, torch.nn.Module], dict] = read_plain_weights
                          ) -> tuple[Path, dict] | None:
    """Restore the newest checkpoint of `run` that loads whole; a damaged one is reported and the next older one
    tried. Returns (its folder, its trainer_state.json), or None when the run has no checkpoint that loads."""
    for path in checkpoint_candidates(run):
        try:
            return path, load_training_state(path, model, optimizer, d, read_weights)
        except CheckpointError as exc:
            warn(f"cannot resume from {path.name} ({exc}): trying the checkpoint before it")
    return None


def load_training_state(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist,
                        read_weights: Callable[[Path, torch.nn.Module], dict] = read_plain_weights) -> dict:
    """Restore model, optimiser and this rank's RNG from a checkpoint; returns trainer_state.json, whose data
    and loop state the caller restores.

    Every file is read and checked before anything is restored, so a damaged checkpoint (CheckpointError) leaves
    the model and optimiser as they were. A rank that the saving run did not have takes rank 0's RNG."""
    state = load_json(path / TRAINER_FILE, "training state file")
    tensors = load_tensors(path / OPTIMIZER_FILE)
    weights = read_weights(path, model)
    rng = {kind: tensors.get(f"rng.{kind}.{d.rank}", tensors.get(f"rng.{kind}.0", tensors.get(f"rng.{kind}")))
           for kind in ("torch", "cuda")}
    if not isinstance(state, dict) or not {"step", "optimizer"} <= state.keys() or rng["torch"] is None:
        raise CheckpointError(f"corrupt checkpoint file {path / TRAINER_FILE}: not a training state")
    bad = [k for k, v in weights.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"checkpoint {path} has weights that are not finite ({bad[0]})")
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    set_optimizer_state_dict(model, optimizer, _unflatten(state["optimizer"], tensors), options=options)
    torch.set_rng_state(rng["torch"])
    if d.device.type == "cuda" and rng["cuda"] is not None:
        torch.cuda.set_rng_state(rng["cuda"], d.device)
    return state


def replace_dir_copy(src: Path, dst: Path) -> None:
    """Copy checkpoint `src` to `dst` (model files only), replacing `dst` atomically (never a folder that holds
    other files)."""
    with staged_dir(dst, CHECKPOINT_FILES) as staging:
        for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE):
            atomic_copy(src / name, staging / name)
