"""The training engine that every loop runs on: pretraining, fine-tuning, the recommender's scorer and healing.

Torchtitan's trainer shape, in parts that each do one job: `Engine` sets up device, parallelism (DDP or FSDP2 under
torchrun, activation checkpointing, compile), optimiser, LR schedule and compute dtype, and runs one `train_step`
over this rank's share of a global batch; `BudgetClock` counts training time across resumes; the checkpointer is
palmkit.train.state; `every` says when periodic work (log, eval, save) is due. The loops around it only fetch
batches, log, evaluate and save.

A step's loss is the mean over every target of the global batch, whatever the number of processes and
micro-batches: each micro-batch's mean is weighted by its share of the batch's targets, so that N processes
with gradient accumulation give the gradient of one process with the whole batch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from palmkit.errors import PalmkitError
from palmkit.train.config import EngineConfig
from palmkit.train.distributed import Dist, all_reduce, grad_sync, parallelize
from palmkit.train.step import compute_autocast, lr_factor, make_optimizer, optimizer_step

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up, then cosine to `min_ratio` (or rsqrt) over `total` steps or a time budget: `lr_factor`."""

    warmup: int
    total: int
    min_ratio: float = 0.0
    kind: str = "cosine"

    def factor(self, step: int, time_fraction: float = 0.0) -> float:
        """Multiplier of the peak learning rate at `step` (0-based)."""
        return lr_factor(step, self.warmup, self.total, self.min_ratio, self.kind, time_fraction)  # type: ignore[arg-type]


@dataclass
class StepResult:
    """One optimiser step: the losses (means over the global batch's targets), the gradient norm before
    clipping, and whether the update was skipped (a loss or gradient that is not finite)."""

    losses: list[float]
    grad_norm: float
    skipped: bool


# A loss function takes the (wrapped) model and one micro-batch and returns its mean loss over the micro-batch's
# targets, or a tuple whose first element is the loss to optimise and the others are reported beside it.
LossFn = Callable[[torch.nn.Module, Any], torch.Tensor | tuple[torch.Tensor, ...]]


class Engine:
    """Device, dtype, parallelism, optimiser and schedule of one run; `train_step` is one optimiser step."""

    def __init__(self, module: torch.nn.Module, cfg: EngineConfig, d: Dist, lr: float, schedule: LRSchedule,
                 weight_decay: float = 0.0, optimizer: str = "adamw", embed_lr_ratio: float = 1.0):
        if cfg.dtype == "float16" and d.device.type != "cuda":
            raise PalmkitError("--train.dtype float16 needs a GPU (--device cuda); on a CPU use bfloat16")
        self.d, self.cfg, self.schedule = d, cfg, schedule
        self.plain = module.to(d.device)
        self.model = parallelize(self.plain, cfg, d)
        self.optimizer = make_optimizer(self.model, lr, weight_decay, optimizer, embed_lr_ratio)  # type: ignore[arg-type]
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.dtype = DTYPES[cfg.dtype]
        self.autocast = compute_autocast(d.device, self.dtype)
        # float16's narrow range underflows small gradients: scale the loss up and the gradients back down
        self.scaler = torch.amp.GradScaler(d.device.type) if self.dtype == torch.float16 else None
        self.bad = self.skipped = 0  # non-finite steps in a row, and in all

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def set_lr(self, step: int, time_fraction: float = 0.0) -> None:
        """The schedule's learning rate of `step` on every parameter group (the one place it is applied)."""
        f = self.schedule.factor(step, time_fraction)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * f

    def _micro_step(self, loss_fn: LossFn, batch: Any, scale: float, sync: bool) -> list[torch.Tensor]:
        """Forward and backward of one micro-batch, its loss weighted by `scale`; returns its detached losses."""
        with grad_sync(self.model, sync):
            with self.autocast:
                out = loss_fn(self.model, batch)
            losses = list(out) if isinstance(out, tuple) else [out]
            loss = losses[0] * scale if scale else losses[0].nan_to_num(0.0) * 0.0
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        return [v.detach() for v in losses]

    def train_step(self, micro_batches: Sequence[tuple[Any, int]], loss_fn: LossFn, step: int,
                   time_fraction: float = 0.0, log: Callable[[dict], None] | None = None) -> StepResult:
        """One optimiser step over this rank's (micro-batch, number of targets) pairs of a global batch.

        Every rank must pass the same number of micro-batches (a rank with nothing left passes one with 0
        targets: it joins the gradient sync and adds nothing). A step whose loss or gradient is not finite is
        skipped and logged; `max_bad_steps` of them in a row end the run with an error.
        """
        self.set_lr(step, time_fraction)
        counts = [float(n) for _, n in micro_batches]
        total = max(all_reduce([sum(counts)], self.d)[0], 1.0)
        sums: list[float] = []
        for i, (batch, n) in enumerate(micro_batches):
            losses = self._micro_step(loss_fn, batch, n * self.d.world_size / total, i == len(micro_batches) - 1)
            values = [float(v) * n if n else 0.0 for v in losses]
            sums = values if not sums else [a + b for a, b in zip(sums, values, strict=True)]
        means = [v / total for v in all_reduce(sums, self.d)]
        grad_norm = self._update() if math.isfinite(means[0]) else math.nan
        if math.isfinite(grad_norm):
            self.bad = 0
            return StepResult(means, grad_norm, False)
        self.bad += 1
        self.skipped += 1
        self.optimizer.zero_grad(set_to_none=True)
        what = "gradient" if math.isfinite(means[0]) else "loss"
        if log:
            log({"step": step, "event": f"non-finite {what}, batch skipped", "consecutive": self.bad,
                 "skipped_batches": self.skipped})
        if self.bad >= self.cfg.max_bad_steps:
            raise PalmkitError(f"loss or gradient was not finite for {self.bad} consecutive steps at step {step}: "
                               "lower --train.lr, raise --train.warmup_steps or train in --train.dtype float32")
        return StepResult(means, grad_norm, True)

    def _update(self) -> float:
        """Clip, step and clear the gradients; returns the norm before clipping (not finite: no update)."""
        clip = self.cfg.grad_clip or math.inf  # 0: no clipping (clip_grad_norm_ would scale by 0)
        if self.scaler is None:
            return float(optimizer_step(self.model, self.optimizer, clip))
        self.scaler.unscale_(self.optimizer)
        norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        self.scaler.step(self.optimizer)  # skips the update itself when the gradient overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict(self) -> dict:
        """The engine's own state for a checkpoint (the model and optimiser are saved by the checkpointer)."""
        return {"skipped_batches": self.skipped, **({"scaler": self.scaler.state_dict()} if self.scaler else {})}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped_batches", 0))
        if self.scaler and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


class BudgetClock:
    """Training time across resumes. With a budget, the ranks' mean decides, so that they all stop together."""

    def __init__(self, minutes: float, before: float, d: Dist):
        self.budget, self.before, self.d = minutes * 60, before, d
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        """This rank's training time so far, across resumes."""
        return self.before + time.perf_counter() - self.started

    def seconds(self) -> float:
        """What decides the stop (and what a resume continues): the ranks' mean with a budget."""
        return all_reduce([self.elapsed()], self.d)[0] / self.d.world_size if self.budget else self.elapsed()

    def fraction(self, seconds: float) -> float:
        """Share of the budget that `seconds` is (0 without a budget)."""
        return seconds / self.budget if self.budget else 0.0


def every(step: int, n: int, last: bool = False) -> bool:
    """Periodic work due at `step`: each n steps (n = 0: never) and at the last step."""
    return last or bool(n and step % n == 0)


def rank_share(batch: Sequence, d: Dist, micro: int) -> list[list]:
    """This rank's contiguous share of a global batch, cut into micro-batches of at most `micro` items.

    Every rank gets the same number of micro-batches (the gradient sync is on the last), some of them empty
    where the batch does not divide evenly; together the shares are the batch in order.
    """
    per = math.ceil(len(batch) / d.world_size)
    mine = list(batch[d.rank * per:(d.rank + 1) * per])
    micro = max(1, min(micro, per))
    return [mine[i * micro:(i + 1) * micro] for i in range(math.ceil(per / micro))]
