"""The options of a pretraining run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class TrainConfig:
    """Everything that defines a pretraining run (saved in every checkpoint)."""

    preset: str = "small"
    seq_len: int = 256
    batch_tokens: int = 16384  # global batch in tokens; accumulation is derived from it and the world size
    micro_batch: int = 16  # sequences per forward pass on each rank
    max_steps: int = 2000  # 0: no step limit (then max_minutes ends the run)
    # Stop (with a checkpoint) after this much training time, counted across resumes; 0: no limit. The cosine
    # then decays over whichever of the two budgets runs out first, so a timed run always ends at min_lr.
    max_minutes: float = 0.0
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    schedule: Literal["cosine", "rsqrt"] = "cosine"
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    z_loss: float = 1e-4
    dropout: float = 0.0
    dtype: Literal["fp32", "bf16"] = "bf16"
    compile: bool = False
    activation_checkpointing: bool = False
    alpha: float = 0.3
    eval_every: int = 100
    eval_sequences: int = 16
    save_every: int = 200
    keep_last: int = 2
    log_every: int = 10
    seed: int = 0
    max_bad_steps: int = 5
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # q, k, v, gate, up as one GEMM (issue 7); checkpoints stay plain. Exact with AdamW; Adafactor's per-matrix
    # RMS scaling then spans the fused matrix, so its updates differ slightly.
    fuse_projections: bool = False
