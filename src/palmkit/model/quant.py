"""int8 weights (`palmkit quantize --int8`): per-output-channel symmetric int8 with a bf16 scale."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from palmkit.errors import PalmkitError
from palmkit.model.fused import is_fused
from palmkit.model.palm import PaLM
from palmkit.model.swap import linear_names, set_module


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale: int8 weights with one scale per output channel (symmetric, weight-only).

    Few rows (decode) go through torch's int8 kernel with bf16 activations; more rows (prefill) multiply by the
    weight converted to the activations' dtype. Outputs come back in the input's dtype.
    """

    # Up to this many rows the int8 kernel, reading a quarter of fp32's bytes, beats converting the weight for
    # one GEMM; past it the converted GEMM wins (the crossover is in benchmarks/README.md, "int8 kernel").
    max_int8_rows = 16

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype = torch.bfloat16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=dtype, device=device))

    @classmethod
    def from_weight(cls, weight: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> Int8Linear:
        """Quantise a float (out, in) weight: scale = max |w| / 127 per row, rounded to nearest."""
        w = weight.detach().float()
        # Quantise against the scale as stored, so that q * scale is the closest the stored pair can get.
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12).to(dtype)
        layer = cls(w.shape[1], w.shape[0], dtype, device=w.device)
        layer.weight.copy_((w / scale.float()[:, None]).round().clamp(-127, 127).to(torch.int8))
        layer.weight_scale.copy_(scale)
        return layer

    def dequantized(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight that this layer multiplies by, in `dtype` (default: the scale's)."""
        return (self.weight.float() * self.weight_scale.float()[:, None]).to(dtype or self.weight_scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        # The kernel needs K % 16 == 0 (at other widths it returns garbage without an error), and only its bf16
        # path is fast: fp32 activations take it many times longer (benchmarks/README.md, "int8 kernel").
        if flat.shape[0] <= self.max_int8_rows and self.in_features % 16 == 0:
            bf16 = torch.bfloat16
            y = torch._weight_int8pack_mm(flat.to(bf16).contiguous(), self.weight, self.weight_scale.to(bf16))
        else:
            # int8 values are exact in bf16, and scaling the output columns costs M*N, not K*N.
            y = F.linear(flat, self.weight.to(flat.dtype)) * self.weight_scale.to(flat.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_int8(model: PaLM, embedding: bool = True, dtype: torch.dtype = torch.bfloat16) -> PaLM:
    """Make every projection of `model` an Int8Linear (in place); `embedding` also quantises the shared one.

    The shared embedding is quantised per vocabulary row, which is the output layer's channel: the output layer
    becomes an Int8Linear (`model.lm_head`) and the input lookup reads its dequantised values, so input and
    output stay tied.
    """
    if is_fused(model):
        raise PalmkitError("quantise a plain model: unfuse_projections(model) first")
    for name in linear_names(model):
        set_module(model, name, Int8Linear.from_weight(model.get_submodule(name).weight, dtype))
    if embedding:
        head = Int8Linear.from_weight(model.embed_tokens.weight, dtype)
        model.lm_head = head
        model.embed_tokens.weight = nn.Parameter(head.dequantized(), requires_grad=False)
    model.embed_tokens.to(dtype)
    for norm in [model.norm, *(b.input_layernorm for b in model.layers)]:
        norm.to(dtype)
    return model.eval()
