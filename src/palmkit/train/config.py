"""The options of a pretraining run, and how a resumed run's options are checked against the saved ones."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from palmkit.errors import PalmkitError
from palmkit.io import load_json

# train_config.json files and checkpoints written before dtypes took torch's names spell them this way.
OLD_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}

# Options that decide what a resumed run continues: the model's shape, the data stream that the saved loader
# position indexes into, and the layout of the restored optimiser state. A resume that changes one of them would
# load state that does not fit, so it is refused; every other option may change on a resume.
RESUME_FIXED = ("preset", "seq_len", "batch_tokens", "alpha", "seed", "optimizer", "embed_lr_ratio",
                "fuse_projections")

# Options added after runs were already being saved, with the value that does what those runs did: a saved
# train_config.json without one of them resumes the way it was trained, whatever the default is now.
ADDED_LATER = {"embed_lr_ratio": 1.0}


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a pretraining run (saved in every checkpoint and in OUT/train_config.json)."""

    preset: str = "small"
    """model size: tiny, mini (the quickstart's), small, base, or a paper size (palm-8b, palm-62b, palm-540b);
    `palmkit info` counts one"""
    seq_len: int = 256
    """tokens per training sequence (the model's context)"""
    batch_tokens: int = 16384
    """global batch in tokens; gradient accumulation follows from it, micro_batch and the world size"""
    micro_batch: int = 16
    """sequences per forward pass on each rank"""
    max_steps: int = 2000
    """optimiser steps to train; 0: no step limit (max_minutes then ends the run)"""
    max_minutes: float = 0.0
    """stop (with a checkpoint) after this much training time, counted across resumes; 0: no limit. The cosine
    decays over whichever of the two budgets runs out first, so a timed run always ends at min_lr"""
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    """adamw, or adafactor: PaLM's Adafactor without factorisation (section 5)"""
    lr: float = 2e-3
    """peak learning rate, reached at the end of warm-up"""
    embed_lr_ratio: float = 10.0
    """AdamW: the token embedding's peak learning rate is lr x this (PaLM's N(0, 1) embedding moves by a far
    smaller share of its size than the N(0, 1/fan_in) kernels at one lr; benchmarks/README.md, "Pretraining
    recipe"); 1: one lr for all"""
    min_lr_ratio: float = 0.1
    """the cosine schedule ends at lr x min_lr_ratio"""
    schedule: Literal["cosine", "rsqrt"] = "cosine"
    """decay after warm-up: cosine to min_lr, or rsqrt, 1/sqrt(step) as in PaLM section 5"""
    warmup_steps: int = 100
    """steps of linear warm-up from 0 to lr"""
    weight_decay: float = 0.1
    """AdamW's decoupled weight decay, on 2-D weights only"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0: no clipping"""
    z_loss: float = 1e-4
    """weight of the auxiliary loss z_loss x log(Z)^2 that keeps the softmax normaliser near 0 (PaLM section 5)"""
    dropout: float = 0.0
    """dropout rate; PaLM pretrains without dropout (section 5)"""
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    """compute dtype: bfloat16 autocasts matmuls and attention (weights, residual stream and loss stay float32);
    float16 does the same with a gradient scaler (for GPUs without bfloat16)"""
    compile: bool = False
    """torch.compile the model (slow to start, faster per step)"""
    activation_checkpointing: bool = False
    """recompute each block's activations in the backward pass: less memory for one more forward pass"""
    alpha: float = 0.3
    """language sampling exponent: language l is drawn with probability proportional to n_l ** alpha"""
    eval_every: int = 100
    """steps between validations (per-language perplexity and bits per byte); 0: none"""
    eval_sequences: int = 16
    """validation sequences per language"""
    save_every: int = 200
    """steps between checkpoints (the last step always saves one); 0: only at the end"""
    keep_last: int = 2
    """checkpoints kept in OUT/checkpoints"""
    log_every: int = 10
    """steps between lines of OUT/metrics.jsonl"""
    seed: int = 0
    """seed of the initial weights and of the data order"""
    max_bad_steps: int = 5
    """stop after this many consecutive steps with a non-finite loss (each one is skipped)"""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """data parallelism under torchrun: ddp (replicated model) or fsdp (FSDP2, sharded model)"""
    fuse_projections: bool = False
    """compute q, k, v and gate, up as one GEMM each; checkpoints stay plain. Exact with AdamW; Adafactor's
    per-matrix RMS scaling then spans the fused matrix, so its updates differ slightly"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", OLD_DTYPES.get(self.dtype, self.dtype))

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """Build from a saved dict (old dtype spellings included), ignoring keys this version does not know.

        Options the dict lacks because they did not exist when it was saved take their ADDED_LATER values.
        """
        names = {f.name for f in fields(cls)}
        return cls(**{**ADDED_LATER, **{k: v for k, v in d.items() if k in names}})


def saved_config(run: str | os.PathLike) -> TrainConfig | None:
    """The options a run was last started with (RUN/train_config.json), or None for a new run."""
    path = Path(run) / "train_config.json"
    if not path.is_file():
        return None
    saved = load_json(path, "run options file")
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
        raise PalmkitError(f"corrupt run file {path}: no 'train' section")
    return TrainConfig.from_dict(saved["train"])


def resume_changes(run: str | os.PathLike, saved: TrainConfig, given: TrainConfig) -> list[str]:
    """The options of `given` that differ from those `run` was saved with, as "name: saved -> given" lines.

    Raises PalmkitError when one of them is in RESUME_FIXED: that resume would not continue the saved run.
    """
    old, new = asdict(saved), asdict(given)
    changed = [k for k in old if old[k] != new[k]]
    fixed = [k for k in changed if k in RESUME_FIXED]
    if fixed:
        diffs = ", ".join(f"{k} {old[k]!r} (given {new[k]!r})" for k in fixed)
        raise PalmkitError(f"cannot resume {run} with other options than it was started with: {diffs}. Keep "
                           "them, or start a new run in another folder (--init_from a checkpoint of this run "
                           "starts from its weights)")
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in changed]


@dataclass(frozen=True)
class EngineConfig:
    """How any training loop runs: compute dtype, compile, activation checkpointing, data parallelism, the step's
    gradient clip and how many non-finite steps in a row end the run. TrainConfig and FinetuneConfig carry these
    options under the same names; `engine_config` reads them off either."""

    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    grad_clip: float = 1.0
    max_bad_steps: int = 5
    fuse_projections: bool = False


def engine_config(cfg) -> EngineConfig:
    """The EngineConfig fields of any options object that has them (missing ones keep their defaults)."""
    return EngineConfig(**{f.name: getattr(cfg, f.name) for f in fields(EngineConfig) if hasattr(cfg, f.name)})
