"""Fused parallel projections: PaLM's parallel block (section 2) feeds one LayerNorm output to attention and
MLP, so q, k, v, gate and up are one matrix product. Exact, for training and inference; checkpoints stay plain.
"""

from __future__ import annotations

import torch
from torch import nn

from palmkit.model.palm import Block, ModelConfig, PaLM

# The plain weights that make up a fused in_proj, in the order of its rows.
FUSED_PARTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")


def fused_sizes(cfg: ModelConfig) -> list[int]:
    """Output widths of q, k, v, gate and up: the row blocks of a fused in_proj."""
    kv = cfg.n_kv_heads * cfg.head_dim
    return [cfg.n_heads * cfg.head_dim, kv, kv, cfg.d_ff, cfg.d_ff]


class FusedBlock(nn.Module):
    """A parallel block whose five input projections are one matrix product: in_proj = cat(q, k, v, gate, up)."""

    def __init__(self, block: Block, cfg: ModelConfig):
        super().__init__()
        attn, mlp = block.self_attn, block.mlp
        weight = torch.cat([block.get_submodule(p).weight.detach() for p in FUSED_PARTS])
        self.sizes = fused_sizes(cfg)
        self.input_layernorm, self.dropout = block.input_layernorm, block.dropout
        self.in_proj = nn.Linear(cfg.d_model, weight.shape[0], bias=False, device="meta")
        self.in_proj.weight = nn.Parameter(weight, requires_grad=attn.q_proj.weight.requires_grad)
        for name in FUSED_PARTS:
            owner, _, leaf = name.partition(".")
            delattr(block.get_submodule(owner), leaf)
        self.self_attn, self.mlp = attn, mlp

    def forward(self, x, cos, sin, mask=None, positions=None, cache=None):
        h = self.input_layernorm(x)
        q, k, v, gate, up = self.in_proj(h).split(self.sizes, dim=-1)
        attn = self.self_attn(h, cos, sin, mask, positions, cache, qkv=(q, k, v))
        return x + self.dropout(attn) + self.dropout(self.mlp(h, gate_up=(gate, up)))


def fuse_projections(model: PaLM) -> PaLM:
    """Replace every Block of `model` (in place) by a FusedBlock; logits and gradients are unchanged."""
    for i, block in enumerate(model.layers):
        if isinstance(block, Block):
            model.layers[i] = FusedBlock(block, model.config)
    return model


def unfuse_projections(model: PaLM) -> PaLM:
    """Undo `fuse_projections` in place: every FusedBlock becomes a plain Block holding the same values."""
    for i, fused in enumerate(model.layers):
        if not isinstance(fused, FusedBlock):
            continue
        with torch.device("meta"):
            block = Block(model.config)
        block.input_layernorm, block.dropout = fused.input_layernorm, fused.dropout
        block.self_attn, block.mlp = fused.self_attn, fused.mlp
        grad = fused.in_proj.weight.requires_grad
        for name, part in zip(FUSED_PARTS, fused.in_proj.weight.detach().split(fused.sizes), strict=True):
            owner, _, leaf = name.partition(".")
            linear = nn.Linear(part.shape[1], part.shape[0], bias=False, device="meta")
            linear.weight = nn.Parameter(part.clone(), requires_grad=grad)
            setattr(block.get_submodule(owner), leaf, linear)
        model.layers[i] = block
    return model


def is_fused(model: nn.Module) -> bool:
    """Whether any block of `model` holds a fused in_proj."""
    return any(isinstance(m, FusedBlock) for m in model.modules())
