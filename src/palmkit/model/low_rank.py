"""Low-rank factorisation (`palmkit compress --method svd`): W ~ (U_r sqrt(S)) (sqrt(S) V_r)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from palmkit.errors import PalmkitError
from palmkit.model.fused import is_fused
from palmkit.model.palm import PaLM
from palmkit.model.swap import linear_names, set_module


class LowRankLinear(nn.Module):
    """W ~ b.weight @ a.weight: a rank-r factorisation of a bias-free linear layer (two thinner GEMMs)."""

    def __init__(self, in_features: int, rank: int, out_features: int, device=None, dtype=None):
        super().__init__()
        self.a = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.b = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def svd_rank(singular_values: torch.Tensor, rank_ratio: float = 0.0, energy: float = 0.0) -> int:
    """Rank kept: `rank_ratio` of the full rank, or the fewest singular values holding `energy` of sum(s^2)."""
    full = singular_values.numel()
    if energy:
        share = (singular_values.double().square().cumsum(0) / singular_values.double().square().sum())
        return min(full, int((share < energy - 1e-12).sum()) + 1)
    return max(1, min(full, round(rank_ratio * full)))


def factorize(linear: nn.Linear, rank: int) -> LowRankLinear:
    """The best rank-`rank` approximation of `linear` (Eckart-Young), split as (U sqrt(S), sqrt(S) V^T)."""
    return _factors(linear.weight.detach(), torch.linalg.svd(linear.weight.detach().double(), full_matrices=False),
                    rank)


def _factors(w: torch.Tensor, svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int) -> LowRankLinear:
    u, s, vh = svd
    root = s[:rank].sqrt()
    layer = LowRankLinear(w.shape[1], rank, w.shape[0], device=w.device, dtype=w.dtype)
    layer.a.weight.data.copy_(root[:, None] * vh[:rank])
    layer.b.weight.data.copy_(u[:, :rank] * root)
    return layer


def low_rank(model: PaLM, rank_ratio: float = 0.0, energy: float = 0.0,
             targets: Iterable[str] = ("self_attn", "mlp"), only_if_smaller: bool = True) -> dict[str, int]:
    """Factorise the chosen projections of `model` in place; returns {layer name: rank}.

    The shared embedding is never factorised. A layer whose factors would hold more parameters than its
    weight is kept whole unless `only_if_smaller` is False (full-rank factorisations reproduce the model).
    """
    if bool(rank_ratio) == bool(energy):
        raise PalmkitError("give exactly one of rank_ratio (0 < r <= 1) or energy (0 < e <= 1)")
    if not 0 < (rank_ratio or energy) <= 1:
        raise PalmkitError(f"rank_ratio and energy must be in (0, 1], got {rank_ratio or energy}")
    if is_fused(model):
        raise PalmkitError("factorise a plain model: unfuse_projections(model) first")
    ranks: dict[str, int] = {}
    for name in linear_names(model, targets):
        linear = model.get_submodule(name)
        out_f, in_f = linear.weight.shape
        svd = torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)
        rank = svd_rank(svd[1], rank_ratio, energy)
        if only_if_smaller and rank * (in_f + out_f) >= in_f * out_f:
            continue
        set_module(model, name, _factors(linear.weight.detach(), svd, rank))
        ranks[name] = rank
    return ranks
