"""PaLM's optimiser (section 5), Adafactor without factorisation, as a few multi-tensor kernels per step."""

from __future__ import annotations

import torch


class PaLMAdafactor(torch.optim.Optimizer):
    """PaLM's optimiser (section 5): Adafactor without factorisation, i.e. Adam with parameter scaling.

    beta2 = 1 - k^-0.8, updates clipped to RMS 1, step scaled by max(1e-3, RMS(param)), weight decay lr^2.
    Each formula runs as one `torch._foreach_*` call over all the parameters of a group, not one small kernel
    per parameter; the per-parameter state (step, exp_avg, exp_avg_sq) is the one a loop would keep, so
    checkpoints of either read in the other.
    """

    def __init__(self, params, lr: float = 1e-2, beta1: float = 0.9, decay_rate: float = 0.8,
                 eps: float = 1e-30, scale_eps: float = 1e-3, clip: float = 1.0, decay_power: float = 2.0):
        super().__init__(params, dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps=eps, scale_eps=scale_eps,
                                      clip=clip, decay_power=decay_power))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            # Parameters that skipped steps (no gradient) have their own step count, hence their own beta2.
            by_step: dict[float, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                by_step.setdefault(float(state["step"]), []).append(p)
            for k, params in by_step.items():
                self._update(params, k, group)

    def _update(self, params: list[torch.Tensor], k: float, group: dict) -> None:
        """One step of parameters that share step count k."""
        lr, beta1 = group["lr"], group["beta1"]
        beta2 = 1.0 - k ** -group["decay_rate"]
        grads = [p.grad.float() for p in params]
        vs = [self.state[p]["exp_avg_sq"] for p in params]
        ms = [self.state[p]["exp_avg"] for p in params]
        root_n = torch.tensor([p.numel() ** 0.5 for p in params], device=params[0].device)
        # v = beta2 v + (1 - beta2)(g^2 + eps)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
        torch._foreach_add_(vs, group["eps"] * (1 - beta2))
        # u = g / sqrt(v), scaled down to RMS `clip` where it is larger
        updates = torch._foreach_div(grads, torch._foreach_sqrt(vs))
        rms = torch.stack(torch._foreach_norm(updates)) / root_n
        torch._foreach_div_(updates, (rms / group["clip"]).clamp(min=1.0).unbind())
        # m = beta1 m + (1 - beta1) u
        torch._foreach_lerp_(ms, updates, 1 - beta1)
        # the step is relative to the parameter's own RMS, read before the decay
        p32 = [p.float() for p in params]
        scale = (torch.stack(torch._foreach_norm(p32)) / root_n).clamp(min=group["scale_eps"])
        steps = torch._foreach_mul(ms, (scale * -lr).unbind())
        torch._foreach_mul_(params, 1 - lr ** group["decay_power"])
        torch._foreach_add_(params, steps)
