"""Faster and smaller matrix products for PaLM models (issue 7), each kept or dropped on measurements.

- Fused parallel projections (PaLM section 2): the parallel block feeds one LayerNorm output to attention and
  MLP, so q, k, v, gate and up are one GEMM. Exact; training and inference. Checkpoints stay plain.
- oneDNN-packed weights for CPU inference: weights reordered once into oneDNN's blocked layout.
- int8 weights (`palmkit quantize --int8`): per-output-channel symmetric int8 with a bf16 scale.
- Low-rank factorisation (`palmkit compress --method svd`): W ~ (U_r sqrt(S)) (sqrt(S) V_r), optionally healed
  by a short fine-tune.

Quantised and factorised checkpoints record their layout in config.json (`quantization`, `low_rank`), and
`palmkit.checkpoint.load_checkpoint` rebuilds it, so every tool that loads checkpoints runs them unchanged.
`python benchmarks/bench_optimize.py` measures every option side by side.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from palmkit.errors import PalmkitError
from palmkit.model import Block, ModelConfig, PaLM

# --------------------------------------------------------------------------------------------------
# 1. Fused parallel projections

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


def plain_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """`state` in the plain layout: each fused in_proj weight split into q, k, v, gate and up."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix, fused, suffix = key.partition("in_proj.weight")
        if not fused or value.dim() != 2:
            out[key] = value
            continue
        for name, part in zip(FUSED_PARTS, value.split(fused_sizes(cfg)), strict=True):
            out[f"{prefix}{name}.weight{suffix}"] = part
    return out


def fused_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `plain_state_dict`: plain weights of each layer concatenated into its in_proj."""
    out = dict(state)
    for key in [k for k in state if k.endswith(f"{FUSED_PARTS[0]}.weight")]:
        prefix = key.removesuffix(f"{FUSED_PARTS[0]}.weight")
        out[f"{prefix}in_proj.weight"] = torch.cat([out.pop(f"{prefix}{p}.weight") for p in FUSED_PARTS])
    return out


def is_fused(model: nn.Module) -> bool:
    """Whether any block of `model` holds a fused in_proj."""
    return any(isinstance(m, FusedBlock) for m in model.modules())


# --------------------------------------------------------------------------------------------------
# 2. Fast GEMM paths for CPU inference


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
            _set_module(model, name, PackedLinear(module))
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, module)


# --------------------------------------------------------------------------------------------------
# 3. int8 weights


class Int8Linear(nn.Module):
    """y = (x @ q^T) * scale: int8 weights with one scale per output channel (symmetric, weight-only).

    Few rows (decode) go through torch's int8 kernel with bf16 activations; more rows (prefill) multiply by the
    weight converted to the activations' dtype. Outputs come back in the input's dtype.
    """

    # Up to this many rows the int8 kernel, reading a quarter of fp32's bytes, beats converting the weight for
    # one GEMM (crossover printed by benchmarks/bench_optimize.py).
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
        # The kernel needs K % 16 == 0 (at other widths it returns garbage without an error), and its fp32
        # path is ~10x slower than its bf16 one.
        if flat.shape[0] <= self.max_int8_rows and self.in_features % 16 == 0:
            bf16 = torch.bfloat16
            y = torch._weight_int8pack_mm(flat.to(bf16).contiguous(), self.weight, self.weight_scale.to(bf16))
        else:
            # int8 values are exact in bf16, and scaling the output columns costs M*N, not K*N.
            y = F.linear(flat, self.weight.to(flat.dtype)) * self.weight_scale.to(flat.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def linear_names(model: nn.Module, targets: Iterable[str] = ("self_attn", "mlp")) -> list[str]:
    """Names of the nn.Linear layers inside blocks whose path contains one of `targets`."""
    targets = tuple(targets)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(f".{t}." in f".{name}." for t in targets)]


def quantize_int8(model: PaLM, embedding: bool = True, dtype: torch.dtype = torch.bfloat16) -> PaLM:
    """Make every projection of `model` an Int8Linear (in place); `embedding` also quantises the shared one.

    The shared embedding is quantised per vocabulary row, which is the output layer's channel: the output layer
    becomes an Int8Linear (`model.lm_head`) and the input lookup reads its dequantised values, so input and
    output stay tied.
    """
    if is_fused(model):
        raise PalmkitError("quantise a plain model: unfuse_projections(model) first")
    for name in linear_names(model):
        _set_module(model, name, Int8Linear.from_weight(model.get_submodule(name).weight, dtype))
    if embedding:
        head = Int8Linear.from_weight(model.embed_tokens.weight, dtype)
        model.lm_head = head
        model.embed_tokens.weight = nn.Parameter(head.dequantized(), requires_grad=False)
    model.embed_tokens.to(dtype)
    for norm in [model.norm, *(b.input_layernorm for b in model.layers)]:
        norm.to(dtype)
    return model.eval()


# --------------------------------------------------------------------------------------------------
# 4. Low-rank factorisation


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
        raise ValueError("give exactly one of rank_ratio (0 < r <= 1) or energy (0 < e <= 1)")
    if not 0 < (rank_ratio or energy) <= 1:
        raise ValueError(f"rank_ratio and energy must be in (0, 1], got {rank_ratio or energy}")
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
        _set_module(model, name, _factors(linear.weight.detach(), svd, rank))
        ranks[name] = rank
    return ranks


def heal(model: PaLM, data: str | os.PathLike, steps: int, lr: float = 3e-4, seq_len: int = 256,
         batch: int = 8, seed: int = 0) -> list[float]:
    """Fine-tune a compressed model for `steps` steps on a corpus's training shards; returns the losses.

    Uses palmkit.train's loader, loss, optimiser and schedule, in fp32 with bf16 autocast like pretraining.
    """
    from palmkit.data import MixtureLoader
    from palmkit.train import (
        TrainConfig,
        compute_autocast,
        forward_backward,
        lr_factor,
        make_optimizer,
        optimizer_step,
    )

    cfg = TrainConfig(lr=lr, seq_len=min(seq_len, model.config.max_seq_len), max_steps=steps, seed=seed,
                      warmup_steps=max(1, steps // 10), z_loss=model.config.z_loss)
    loader = MixtureLoader(data, cfg.seq_len, batch, cfg.alpha, seed)
    vocab = max(int(s.index["vocab_size"]) for s in loader.streams.values())
    if vocab != model.config.vocab_size:
        raise PalmkitError(f"corpus {data} was tokenised with a vocabulary of {vocab}, the model has "
                           f"{model.config.vocab_size}: heal on a corpus built with the model's tokenizer")
    optimizer = make_optimizer(model, cfg)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    autocast = compute_autocast(cfg, torch.device("cpu"))
    losses = []
    model.train()
    for _ in range(steps):
        x, y, _ = loader.next_batch()
        losses.append(float(forward_backward(model, x, y, cfg, autocast)[1]))
        optimizer_step(model, optimizer, cfg)
        schedule.step()
    model.eval()
    return losses


# --------------------------------------------------------------------------------------------------
# Checkpoint layouts


def storable_state(model: PaLM, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores for `model`: fused weights split; an int8 shared embedding by its name."""
    if is_fused(model):
        state = plain_state_dict(state, model.config)
    if isinstance(getattr(model, "lm_head", None), Int8Linear):
        # The input lookup's dequantised copy is rebuilt at load time: only the int8 values are stored.
        state["embed_tokens.weight"] = state.pop("lm_head.weight")
        state["embed_tokens.weight_scale"] = state.pop("lm_head.weight_scale")
    return state


def saved_layout(model: PaLM) -> dict:
    """The config.json sections that describe a quantised or factorised model's layout ({} for a plain one)."""
    out: dict = {}
    int8 = [n for n, m in model.named_modules() if isinstance(m, Int8Linear)]
    if int8:
        scale = next(m.weight_scale for m in model.modules() if isinstance(m, Int8Linear))
        out["quantization"] = {"method": "int8", "granularity": "per-output-channel", "symmetric": True,
                               "layers": [n for n in int8 if n != "lm_head"],
                               "embedding": "lm_head" in int8, "dtype": str(scale.dtype).removeprefix("torch.")}
    ranks = {n: m.a.out_features for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    if ranks:
        out["low_rank"] = {"method": "svd", "ranks": ranks}
    return out


def restore_layout(model: PaLM, config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swap into a (meta-device) model the layers that config.json describes; returns the state to load."""
    for name, rank in config.get("low_rank", {}).get("ranks", {}).items():
        out_f, in_f = model.get_submodule(name).weight.shape
        _set_module(model, name, LowRankLinear(in_f, rank, out_f, device="meta"))
    quant = config.get("quantization")
    if not quant:
        return state
    if quant.get("method") != "int8":
        raise PalmkitError(f"unknown quantization method {quant.get('method')!r} in config.json")
    dtype = getattr(torch, quant.get("dtype", "bfloat16"))
    for name in quant["layers"]:
        out_f, in_f = model.get_submodule(name).weight.shape
        _set_module(model, name, Int8Linear(in_f, out_f, dtype, device="meta"))
    if quant.get("embedding"):
        state = dict(state)
        head = Int8Linear(model.config.d_model, model.config.vocab_size, dtype)
        head.weight, head.weight_scale = state.pop("embed_tokens.weight"), state.pop("embed_tokens.weight_scale")
        model.lm_head = head
        state["embed_tokens.weight"] = head.dequantized()
        state.update({f"lm_head.{k}": v for k, v in head.state_dict().items()})
    return state


def dense_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Plain float weights of any stored layout: int8 dequantised, factors multiplied back (for export)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith(".weight_scale"):
            continue
        if value.dtype == torch.int8:
            value = value.float() * state[key + "_scale"].float()[:, None]
        elif key.endswith(".a.weight"):
            prefix = key.removesuffix("a.weight")
            key, value = prefix + "weight", state[prefix + "b.weight"] @ value
        elif key.endswith(".b.weight"):
            continue
        out[key] = value
    return out


def file_size(path: str | os.PathLike) -> int:
    """Bytes on disk of a checkpoint's weights."""
    from palmkit.checkpoint import MODEL_FILE

    return (Path(path) / MODEL_FILE).stat().st_size


# --------------------------------------------------------------------------------------------------
# Commands


def quantize_command(checkpoint: str, out: str, int8: bool = True, embedding: bool = True,
                     dtype: Literal["bfloat16", "float32"] = "bfloat16") -> str:
    """Write an int8-weight copy of CHECKPOINT to OUT (per-channel symmetric; activations in --dtype).

    --no-embedding keeps the shared input/output embedding in --dtype. The copy loads wherever checkpoints
    load (`palmkit generate`, the server), from safetensors only.
    """
    from palmkit.checkpoint import load_checkpoint, save_checkpoint

    if not int8:
        raise PalmkitError("int8 is the only quantisation palmkit has: pass --int8")
    model, tokenizer, config = load_checkpoint(checkpoint)
    _require_plain(config, checkpoint)
    t0 = time.perf_counter()
    quantize_int8(model, embedding=embedding, dtype=getattr(torch, dtype))
    extra = {k: v for k, v in config.items() if k != "model"}
    save_checkpoint(out, model, tokenizer, extra={**extra, **saved_layout(model)})
    return (f"int8 checkpoint written to {out} in {time.perf_counter() - t0:.1f}s: "
            f"{file_size(checkpoint) / 2**20:.1f} MiB -> {file_size(out) / 2**20:.1f} MiB")


def compress_command(checkpoint: str, out: str, method: Literal["svd"] = "svd", rank_ratio: float = 0.0,
                     energy: float = 0.0, targets: list[str] | None = None, heal_steps: int = 0, data: str = "",
                     lr: float = 3e-4, seq_len: int = 256, batch: int = 8) -> str:
    """Write a low-rank copy of CHECKPOINT to OUT: each chosen projection becomes two thinner ones (truncated SVD).

    Give --rank-ratio R (rank kept / full rank) or --energy E (share of sum(s^2) kept). --targets picks the
    blocks' sub-layers (default: self_attn mlp); the shared embedding is never factorised. --heal-steps N
    --data CORPUS then fine-tunes the compressed model for N steps on the corpus.
    """
    from palmkit.checkpoint import load_checkpoint, save_checkpoint

    if method != "svd":
        raise PalmkitError(f"unknown compression method {method!r}: svd is the one palmkit has")
    if heal_steps and not data:
        raise PalmkitError("--heal-steps needs --data CORPUS (a corpus built with the checkpoint's tokenizer)")
    model, tokenizer, config = load_checkpoint(checkpoint)
    _require_plain(config, checkpoint)
    before = model.num_params()
    ranks = low_rank(model, rank_ratio, energy, targets or ("self_attn", "mlp"))
    losses = heal(model, data, heal_steps, lr, seq_len, batch) if heal_steps else []
    extra = {k: v for k, v in config.items() if k != "model"}
    layout = saved_layout(model)
    layout.setdefault("low_rank", {"method": "svd", "ranks": {}}).update(
        rank_ratio=rank_ratio, energy=energy, heal_steps=heal_steps)
    save_checkpoint(out, model, tokenizer, extra={**extra, **layout})
    healed = f"; healed {heal_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else ""
    return (f"{len(ranks)} layers factorised, parameters {before:,} -> {model.num_params():,}, "
            f"{file_size(checkpoint) / 2**20:.1f} MiB -> {file_size(out) / 2**20:.1f} MiB{healed}")


def _require_plain(config: dict, checkpoint: str) -> None:
    if "quantization" in config or "low_rank" in config:
        raise PalmkitError(f"{checkpoint} is already quantised or factorised: start from a plain checkpoint")
