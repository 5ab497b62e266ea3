"""One optimisation step: AdamW or PaLM's Adafactor, the learning-rate schedule, autocast, forward/backward, clip."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch

from palmkit.train.optim import PaLMAdafactor


def make_optimizer(model_or_params: torch.nn.Module | Iterable[torch.nn.Parameter], lr: float,
                   weight_decay: float = 0.0, kind: Literal["adamw", "adafactor"] = "adamw",
                   embed_lr_ratio: float = 1.0) -> torch.optim.Optimizer:
    """AdamW with weight decay on 2-D weights only (not LayerNorm scales), or ("adafactor") PaLM's Adafactor.

    Only parameters that require gradients are optimised (frozen weights under LoRA are left out).
    embed_lr_ratio: under AdamW, the token embedding (`embed_tokens`) of a model learns at lr x this, in a
    group of its own; at 1 there are the two groups AdamW always had, so older optimiser states still load.
    """
    if isinstance(model_or_params, torch.nn.Module):
        named = [(n, p) for n, p in model_or_params.named_parameters() if p.requires_grad]
    else:
        named = [("", p) for p in model_or_params if p.requires_grad]
    params = [p for _, p in named]
    if kind == "adafactor":
        return PaLMAdafactor(params, lr=lr)
    # PaLM initialises the embedding N(0, 1) and the kernels N(0, 1/fan_in) (section 2, for Adafactor, whose
    # steps scale with each parameter's RMS); AdamW moves every weight by about lr, a far smaller share of the
    # embedding's RMS, so the embedding gets the larger lr that parameter scaling would give it.
    embed = [p for n, p in named if embed_lr_ratio != 1.0 and n.endswith("embed_tokens.weight")]
    decay = [p for p in params if p.dim() >= 2 and all(p is not e for e in embed)]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if embed:
        groups.append({"params": embed, "weight_decay": weight_decay, "lr": lr * embed_lr_ratio})
    # The fused kernel reads and writes each tensor once; the default runs one pass per elementwise operation.
    fused = all(p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def lr_factor(step: int, warmup: int, total: int, min_ratio: float = 0.0,
              schedule: Literal["cosine", "rsqrt"] = "cosine", time_fraction: float = 0.0) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up, then cosine or 1/sqrt(k).

    The cosine runs from the end of `warmup` to `total` steps (0: no step budget) and ends at `min_ratio`;
    `time_fraction` is the share of a time budget spent (0: none), and the cosine follows steps or time,
    whichever is further.
    """
    warm = max(1, warmup)
    if step < warmup:
        return (step + 1) / warm
    if schedule == "rsqrt":  # PaLM: constant for the warm-up steps, then decay as 1/sqrt(k)
        return math.sqrt(warm / (step + 1))
    by_steps = (step - warmup) / max(1, total - warmup) if total else 0.0
    progress = min(1.0, max(by_steps, time_fraction))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def compute_autocast(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> torch.autocast:
    """Matmuls and attention in `dtype` with fp32 weights, residual stream and loss; off when dtype is fp32."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def forward_backward(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, autocast,
                     accum: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss (total, cross-entropy, z-loss) of one of `accum` micro-batches; adds its gradients / accum to .grad."""
    with autocast:
        total, ce, z = model(inputs, targets=targets)
    (total / accum).backward()
    return total.detach(), ce.detach(), z.detach()


def optimizer_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """Clip the gradient norm, update the weights and clear the gradients; returns the norm before clipping.

    A norm that is not finite (an inf or nan in some gradient, even with a finite loss) skips the update: clipping
    would scale the gradients by 0 and turn the infs into nans in the weights. The caller sees it in the norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if math.isfinite(float(grad_norm)):  # the global norm: every rank takes the same branch
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
