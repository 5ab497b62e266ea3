"""oneDNN-packed weights for CPU inference: each weight reordered once into oneDNN's blocked layout."""

from __future__ import annotations

import torch
from torch import nn

from palmkit.model.palm import PaLM
from palmkit.model.swap import set_module


class PackedLinear(nn.Module):
    """A bias-free linear layer whose weight oneDNN reorders once into its blocked layout (inference only).

    The plain weight stays registered, so state dicts and checkpoints do not change.
    """

    def __init__(self, linear: nn.Linear, batch_hint: int = 1):
        super().__init__()
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def pack_for_cpu(model: PaLM) -> PaLM:
    """Swap every nn.Linear of an inference model (on CPU) for a PackedLinear, in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and module.weight.device.type == "cpu":
            set_module(model, name, PackedLinear(module))
    return model
