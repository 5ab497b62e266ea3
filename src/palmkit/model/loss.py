"""The causal-LM loss with PaLM's auxiliary z-loss (section 5), plain and chunked through the output layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, z_loss: float = 1e-4,
            ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, cross-entropy, z-loss) averaged over targets != ignore_index; z-loss = coef * log^2 Z."""
    logits = logits.float().flatten(0, -2)
    targets = targets.flatten()
    valid = targets != ignore_index
    n = valid.sum().clamp(min=1)
    log_z = torch.logsumexp(logits, dim=-1)
    ce = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum") / n
    z = z_loss * (log_z.square() * valid).sum() / n
    return ce + z, ce, z


def _chunked_loss(h, weight, targets, scale, z_loss, ignore_index, chunk, with_grad):
    """Means of cross-entropy and z-loss over valid rows, and the gradients of their sum if asked for.

    Only a chunk of rows of the (rows, vocab) logits exists at a time: they are the largest tensors of a
    training step and the passes over them are memory-bound. Making the gradients here, while a
    chunk's soft-max is at hand, costs no more matmuls than autograd would, and one exp per logit, not two.
    """
    dev = h.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
    # A (d, vocab) copy for the reduced-precision matmuls: oneDNN would repack a transposed weight on
    # every call. MKL's fp32 matmul reads either layout at the same speed.
    wt = weight.t() if compute == weight.dtype else weight.to(compute).t().contiguous()
    hs = (h * scale).float()  # (h s) W^T: the logit scale is paid on (rows, d), not on (rows, vocab)
    hs_c = hs.to(compute)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    n = valid.sum().clamp(min=1)
    ce_sum = z_sum = h.new_zeros((), dtype=torch.float32)
    grad_h = torch.empty_like(h) if with_grad else None
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grad else None
    with torch.autocast(dev, enabled=False):
        for i in range(0, h.shape[0], chunk):
            rows = slice(i, i + chunk)
            t, ok = safe[rows], valid[rows]
            logits = hs_c[rows] @ wt
            # In bf16 the soft-max accumulates in fp32 and rounds once, as the matmul below would
            p = torch.softmax(logits, dim=-1)
            # The largest probability is exp(max logit - log Z) >= 1/vocab, so its log never underflows
            log_z = logits.amax(-1).float() - p.amax(-1).float().log()
            ce_sum = ce_sum + ((log_z - logits.gather(1, t[:, None])[:, 0].float()) * ok).sum()
            z_sum = z_sum + (log_z.square() * ok).sum()
            del logits
            if not with_grad:
                continue
            # d(ce + z log^2 Z)/d logits = a p - b onehot(target) with per-row a and b; applying them to
            # the (rows, d) sides of the matmuls spares a pass over the (rows, vocab) soft-max
            a = ((1 + 2 * z_loss * log_z) * ok / n)[:, None]
            b = (ok / n)[:, None]
            grad_h[rows] = ((a * (p @ wt.T).float() - b * weight[t].float()) * scale).to(h.dtype)
            if compute == grad_w.dtype:
                grad_w.addmm_(p.T, a * hs[rows])  # accumulates inside the matmul
            else:  # a bf16 matmul cannot add into fp32
                grad_w.add_(p.T @ (a * hs[rows]).to(compute))
    if with_grad:
        grad_w.index_add_(0, safe, -(valid / n)[:, None] * hs)
    return ce_sum / n, z_loss * z_sum / n, grad_h, grad_w


class _FusedLMLoss(torch.autograd.Function):
    """Output layer + cross-entropy + z-loss whose backward only scales gradients made in the forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, scale, z_loss, ignore_index, chunk):
        ce, z, grad_h, grad_w = _chunked_loss(h, weight, targets, scale, z_loss, ignore_index, chunk, True)
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(ce, z)
        return ce + z, ce, z

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_z):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total, grad_w * grad_total, None, None, None, None, None


def fused_lm_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, scale: float = 1.0,
                  z_loss: float = 1e-4, ignore_index: int = -100,
                  chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`lm_loss(F.linear(h, weight) * scale, targets, ...)` computed `chunk` rows at a time.

    Gradients flow through `total` only: cross-entropy and z-loss come back detached, for logging.
    chunk 0: a multiple of 64 rows making about 2^24 logits (512 rows of a 32k vocabulary), picked by timing
    chunks of 256 to 2048 rows (benchmarks/README.md, "Output-layer loss chunk").
    """
    h, targets = h.flatten(0, -2), targets.flatten()
    chunk = chunk or max(64, 2**24 // weight.shape[0] // 64 * 64)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedLMLoss.apply(h, weight, targets, scale, z_loss, ignore_index, chunk)
    ce, z, _, _ = _chunked_loss(h, weight, targets, scale, z_loss, ignore_index, chunk, False)
    return ce + z, ce, z
