"""The PaLM model (Chowdhery et al. 2022, https://arxiv.org/abs/2204.02311, section 2).

Weight names follow Hugging Face's Cohere layout, whose architecture is PaLM's, so export is a rename.
This file holds the model only: no distributed, logging or file I/O code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from palmkit.errors import PalmkitError
from palmkit.model.loss import fused_lm_loss


@dataclass
class ModelConfig:
    """Shape and numerics of a PaLM model."""

    vocab_size: int = 32000
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    n_kv_heads: int = 1  # multi-query attention (section 2); >1 gives GQA, n_heads gives MHA
    head_dim: int = 0  # 0 means d_model // n_heads; the paper presets use 256
    d_ff: int = 0  # 0 means 4 * d_model
    max_seq_len: int = 1024
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    z_loss: float = 1e-4  # section 5: 1e-4 * log^2 Z keeps the softmax normaliser near 0
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        self.head_dim = self.head_dim or self.d_model // self.n_heads
        self.d_ff = self.d_ff or 4 * self.d_model
        if self.n_heads % self.n_kv_heads:
            raise PalmkitError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise PalmkitError(f"head_dim={self.head_dim} must be even for rotary embeddings")

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Build from a dict, ignoring keys this version does not know."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_dict(self) -> dict:
        return asdict(self)

    def num_params(self) -> int:
        """Parameter count from the formula (embeddings counted once: they are shared)."""
        d, hd = self.d_model, self.head_dim
        attn = d * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        layer = attn + 3 * d * self.d_ff + d
        return self.vocab_size * d + self.n_layers * layer + d

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, 6N + 12 L d T (PaLM appendix B).

        N includes the shared embedding because the output layer multiplies by it.
        """
        t = seq_len or self.max_seq_len
        return 6 * self.num_params() + 12 * self.n_layers * self.d_model * t


# Paper shapes are Table 1; the small ones scale the same recipe down for CPUs. Fields left out
# (head_dim, d_ff) are derived, so overriding d_model in `preset()` rescales them too.
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=4096, d_model=128, n_layers=2, n_heads=4, max_seq_len=256),
    # the quickstart's: minutes of CPU training buy a few million tokens, which a model this size uses best
    # (benchmarks/README.md, "Pretraining recipe")
    "mini": dict(vocab_size=16000, d_model=256, n_layers=4, n_heads=4, max_seq_len=1024),
    "small": dict(vocab_size=32000, d_model=384, n_layers=6, n_heads=6, max_seq_len=1024),
    "base": dict(vocab_size=32000, d_model=768, n_layers=12, n_heads=12, max_seq_len=2048),
    "palm-8b": dict(vocab_size=256000, d_model=4096, n_layers=32, n_heads=16, head_dim=256, max_seq_len=2048),
    "palm-62b": dict(vocab_size=256000, d_model=8192, n_layers=64, n_heads=32, head_dim=256, max_seq_len=2048),
    "palm-540b": dict(vocab_size=256000, d_model=18432, n_layers=118, n_heads=48, head_dim=256, max_seq_len=2048),
}


def preset(name: str, **overrides) -> ModelConfig:
    """The config of a named preset with some fields replaced."""
    if name not in PRESETS:
        raise PalmkitError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


class LayerNorm(nn.Module):
    """LayerNorm with a scale and no bias (section 2, "No biases")."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, self.eps)


def rotary_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape (max_seq_len, head_dim), each frequency repeated for its (2i, 2i+1) pair."""
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
    angles = torch.outer(torch.arange(cfg.max_seq_len, device=device).float(), inv_freq)
    angles = angles.repeat_interleave(2, dim=-1)  # interleaved pairs, as Cohere does
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x (B, H, T, hd) by angles given per (B, 1, T, hd) or (T, hd)."""
    if torch.compiler.is_compiling():
        # inductor generates no code for complex numbers, and fuses this real form into one kernel
        x1, x2 = x[..., 0::2], x[..., 1::2]
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        return (x.float() * cos + rotated.float() * sin).to(x.dtype)
    # Eager: the pair (x0, x1) times cos + i sin is one complex multiply, one pass over x where the real form
    # makes several, forward and backward (timed in benchmarks/README.md, "Rotary embeddings")
    turn = torch.complex(cos[..., 0::2], sin[..., 0::2])
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * turn).flatten(-2).to(x.dtype)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + causal mask) v as two batched matmuls; each key/value head serves its group."""
    B, H, T, hd = q.shape
    kv = k.shape[1]
    q = q.reshape(B * kv, H // kv * T, hd)
    s = (q @ k.reshape(B * kv, T, hd).transpose(1, 2)).view(B, H, T, T)
    causal = torch.full((T, T), float("-inf"), device=q.device).triu(1)
    p = torch.add(causal, s, alpha=hd ** -0.5).softmax(-1).to(q.dtype)  # fp32 scores, as flash keeps them
    return (p.view(B * kv, H // kv * T, T) @ v.reshape(B * kv, T, hd)).view(B, H, T, hd)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hd) + mask) v for queries (B, H, T, hd) over cached keys and values (B, kv, n, hd) with
    an additive mask (B, 1, T, n); fp32 scores, each key/value head serving its group of query heads."""
    B, H, T, hd = q.shape
    kv = k.shape[1]
    s = (q.reshape(B, kv, H // kv * T, hd) @ k.transpose(2, 3)).view(B, kv, H // kv, T, -1)
    p = torch.add(mask[:, :, None].float(), s.float(), alpha=hd ** -0.5).softmax(-1).to(q.dtype)
    return (p.view(B, kv, H // kv * T, -1) @ v).view(B, H, T, hd)


class KVCache:
    """Preallocated keys and values, written at each row's own positions (gpt-fast style)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int | None = None, dtype=torch.float32,
                 device=None):
        shape = (batch, cfg.n_kv_heads, max_len or cfg.max_seq_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def rows(self, index: slice | torch.Tensor) -> KVCache:
        """A cache over some batch rows; a slice is a view that writes through (the server's slots)."""
        view = KVCache.__new__(KVCache)
        view.k = [k[index] for k in self.k]
        view.v = [v[index] for v in self.v]
        return view


class Attention(nn.Module):
    """Multi-query attention with rotary embeddings (section 2)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin, mask=None, positions=None, cache=None, qkv=None):
        """qkv: projections computed by the caller (a fused block); by default computed here."""
        B, T, _ = x.shape
        q, k, v = qkv if qkv is not None else (self.q_proj(x), self.k_proj(x), self.v_proj(x))
        q = apply_rotary(q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2), cos, sin)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            cache_k, cache_v, n_keys = cache
            # Indexed writes, not scatter_: torch's bfloat16 scatter_ copies the whole cache on every call
            # (benchmarks/README.md, "Decode step kernels")
            rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
            cache_k.transpose(1, 2)[rows, positions] = k.transpose(1, 2).to(cache_k.dtype)
            cache_v.transpose(1, 2)[rows, positions] = v.transpose(1, 2).to(cache_v.dtype)
            k, v = cache_k[:, :, :n_keys].to(q.dtype), cache_v[:, :, :n_keys].to(q.dtype)
            if T == 1:
                # A decode step: two batched matmuls beat SDPA's CPU kernel with a mask, several times over in
                # bfloat16 (benchmarks/README.md, "Decode step kernels")
                return self.o_proj(cached_attention(q, k, v, mask).transpose(1, 2).reshape(B, T, -1))
        if mask is None and cache is None and torch.compiler.is_compiling() and q.device.type == "cpu" and T <= 512:
            # CPU flash attention's backward runs a small oneDNN matmul per block of keys; compiled, two
            # batched matmuls around a fused soft-max do the same work in a few large kernels, and on short
            # sequences the (T, T) scores cost less memory than the block's other activations (timed in
            # benchmarks/README.md, "Causal attention under torch.compile")
            y = causal_attention(q, k, v)
        else:
            # enable_gqa lets one key/value head serve every query head without copying it
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward (section 2): down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, gate_up=None) -> torch.Tensor:
        gate, up = gate_up if gate_up is not None else (self.gate_proj(x), self.up_proj(x))
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    """Parallel formulation (section 2): y = x + attn(ln(x)) + mlp(ln(x)), one LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, cos, sin, mask=None, positions=None, cache=None):
        h = self.input_layernorm(x)
        return x + self.dropout(self.self_attn(h, cos, sin, mask, positions, cache)) + self.dropout(self.mlp(h))


class PaLM(nn.Module):
    """Decoder-only PaLM language model."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = LayerNorm(cfg.d_model, cfg.norm_eps)
        cos, sin = rotary_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # Shared input/output embeddings; logits scaled by 1/sqrt(d) (section 2, "Shared embeddings")
        self.logit_scale = cfg.d_model ** -0.5
        self.lm_head: nn.Module | None = None  # None: the shared embedding; quantize_int8 sets an int8 copy
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PaLM initialisation: kernels N(0, 1/fan_in), embeddings N(0, 1), LayerNorm scales 1."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=m.in_features ** -0.5)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=1.0)
            elif isinstance(m, LayerNorm):
                nn.init.ones_(m.weight)
        if self.rope_cos.device.type != "meta":
            self.rope_cos, self.rope_sin = rotary_tables(self.config, self.rope_cos.device)

    def _apply(self, fn, recurse=True):
        # Rotary tables stay fp32 whatever dtype the weights take: bf16 angles drift at long positions.
        super()._apply(fn, recurse)
        if self.rope_cos.device.type != "meta" and self.rope_cos.dtype != torch.float32:
            self.rope_cos, self.rope_sin = rotary_tables(self.config, self.rope_cos.device)
        return self

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      pad_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                      n_keys: int | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, d).

        positions (B, T): each token's position, 0..T-1 by default. pad_mask (B, T): False at padding
        (needed only for left padding; right padding is already hidden by causality). cache: keys and
        values are written at `positions`, and each query sees the cached positions up to its own.
        n_keys: with a cache, the largest position + 1 if the caller knows it (it saves a device sync).
        """
        T = idx.shape[1]
        if T > self.config.max_seq_len:
            raise PalmkitError(f"sequence of {T} tokens is longer than the context ({self.config.max_seq_len})")
        if positions is None and cache is not None:  # the cache is written at explicit positions
            positions = torch.arange(T, device=idx.device).expand(idx.shape[0], T)
        if positions is None:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]  # broadcast over the batch: no gather
        else:
            cos, sin = self.rope_cos[positions].unsqueeze(1), self.rope_sin[positions].unsqueeze(1)
        mask = None
        if cache is not None:
            if n_keys is None:  # reading positions waits for the device; decode loops pass it
                n_keys = int(positions.max()) + 1
            keys = torch.arange(n_keys, device=idx.device)
            mask = (keys <= positions[..., None]).unsqueeze(1)
        elif pad_mask is not None:
            keys = torch.arange(T, device=idx.device)
            causal = keys[None, :] <= keys[:, None]
            # A padded query still sees itself so that its softmax row is never empty (no NaN).
            mask = (causal & pad_mask[:, None, :].bool()) | torch.eye(T, dtype=torch.bool, device=idx.device)
            mask = mask.unsqueeze(1)
        x = self.embed_tokens(idx)
        if mask is not None:
            # Additive form once, not in every layer's attention: the same 0 / -inf that SDPA would make.
            mask = torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill_(~mask, float("-inf"))
        for i, layer in enumerate(self.layers):
            layer_cache = (cache.k[i], cache.v[i], n_keys) if cache is not None else None
            x = layer(x, cos, sin, mask, positions, layer_cache)
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Output logits from hidden states through the shared embedding."""
        if self.lm_head is not None:
            return self.lm_head(h) * self.logit_scale
        return F.linear(h, self.embed_tokens.weight) * self.logit_scale

    def forward(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                pad_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                targets: torch.Tensor | None = None):
        """Logits (B, T, vocab) for token ids (B, T); with targets, `fused_lm_loss` (total, ce, z) instead.

        The loss goes through forward so that DDP, FSDP2 and torch.compile, which wrap forward, see it.
        """
        h = self.hidden_states(idx, positions, pad_mask, cache)
        if targets is None:
            return self.logits(h)
        return fused_lm_loss(h, self.embed_tokens.weight, targets, self.logit_scale, self.config.z_loss)


def build_model(cfg: ModelConfig, device: str | torch.device | None = None, seed: int | None = None) -> PaLM:
    """A freshly initialised model; on the meta device nothing is allocated (for the paper presets)."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        return PaLM(cfg)
