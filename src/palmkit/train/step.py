"""One optimisation step: AdamW or PaLM's Adafactor, the learning-rate schedule, autocast, forward/backward, clip."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Literal

import torch


class PaLMAdafactor(torch.optim.Optimizer):
    """PaLM's optimiser (section 5): Adafactor without factorisation, i.e. Adam with parameter scaling.

    beta2 = 1 - k^-0.8, updates clipped to RMS 1, step scaled by max(1e-3, RMS(param)), weight decay lr^2.
    """

    def __init__(self, params, lr: float = 1e-2, beta1: float = 0.9, decay_rate: float = 0.8,
                 eps: float = 1e-30, scale_eps: float = 1e-3, clip: float = 1.0, decay_power: float = 2.0):
        super().__init__(params, dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps=eps, scale_eps=scale_eps,
                                      clip=clip, decay_power=decay_power))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr = group["lr"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                k = state["step"].item()
                beta2 = 1.0 - k ** -group["decay_rate"]
                g = p.grad.float()
                state["exp_avg_sq"].mul_(beta2).add_(g.square() + group["eps"], alpha=1 - beta2)
                update = g / state["exp_avg_sq"].sqrt()
                update /= (update.square().mean().sqrt() / group["clip"]).clamp(min=1.0)
                state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
                scale = p.float().square().mean().sqrt().clamp(min=group["scale_eps"])
                p.mul_(1 - lr ** group["decay_power"])
                p.add_(state["exp_avg"] * scale, alpha=-lr)


def make_optimizer(model_or_params: torch.nn.Module | Iterable[torch.nn.Parameter], lr: float,
                   weight_decay: float = 0.0, kind: Literal["adamw", "adafactor"] = "adamw",
                   ) -> torch.optim.Optimizer:
    """AdamW with weight decay on 2-D weights only (not LayerNorm scales), or ("adafactor") PaLM's Adafactor.

    Only parameters that require gradients are optimised (frozen weights under LoRA are left out).
    """
    source = model_or_params.parameters() if isinstance(model_or_params, torch.nn.Module) else model_or_params
    params = [p for p in source if p.requires_grad]
    if kind == "adafactor":
        return PaLMAdafactor(params, lr=lr)
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
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
    """Clip the gradient norm, update the weights and clear the gradients; returns the norm before clipping."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm
