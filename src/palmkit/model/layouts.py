"""The one state-dict adapter: every translation between weight layouts lives here.

The plain layout (Hugging Face Cohere names, one weight per projection) is what checkpoints hold. Fused
projections are a runtime layout; int8 and low-rank layers are stored as they are and described in config.json
(`quantization`, `low_rank`) so that loading rebuilds them; export wants dense weights under `model.` names.
"""

from __future__ import annotations

import torch

from palmkit.errors import PalmkitError
from palmkit.model.fused import FUSED_PARTS, fused_sizes, is_fused
from palmkit.model.low_rank import LowRankLinear
from palmkit.model.palm import ModelConfig, PaLM
from palmkit.model.quant import Int8Linear
from palmkit.model.swap import set_module


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in the plain PaLM layout, whatever wrappers (compile, DDP, FSDP2) it wears."""
    model = getattr(model, "_orig_mod", model)  # torch.compile
    model = getattr(model, "module", model)  # DistributedDataParallel
    # FSDP2 shards parameters as DTensors; full_tensor() gathers them (a collective: call on every rank).
    state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    # Fused projections are a runtime layout, so they are stored split; an int8 shared embedding is stored once
    # (its dequantised lookup copy is rebuilt at load time).
    return storable_state(model, state)


def hf_state_dict(state: dict) -> dict:
    """palmkit weight names to CohereForCausalLM's: a prefix, nothing else."""
    # The output layer is the tied input embedding, so lm_head.weight is not written.
    return {f"model.{name}": t for name, t in state.items()}


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


def is_dense(config: dict) -> bool:
    """Whether a checkpoint's config.json describes plain dense weights (no int8 or low-rank layers)."""
    return "quantization" not in config and "low_rank" not in config


def require_dense(config: dict, checkpoint: str, then: str) -> None:
    """Refuse a quantised or factorised checkpoint for a step that needs dense weights (`then`: that step)."""
    if not is_dense(config):
        raise PalmkitError(f"{checkpoint} is quantised or factorised: {then} from a plain checkpoint")


def restore_layout(model: PaLM, config: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Swap into a (meta-device) model the layers that config.json describes; returns the state to load."""
    for name, rank in config.get("low_rank", {}).get("ranks", {}).items():
        out_f, in_f = model.get_submodule(name).weight.shape
        set_module(model, name, LowRankLinear(in_f, rank, out_f, device="meta"))
    quant = config.get("quantization")
    if not quant:
        return state
    if quant.get("method") != "int8":
        raise PalmkitError(f"unknown quantization method {quant.get('method')!r} in config.json")
    dtype = getattr(torch, quant.get("dtype", "bfloat16"))
    for name in quant["layers"]:
        out_f, in_f = model.get_submodule(name).weight.shape
        set_module(model, name, Int8Linear(in_f, out_f, dtype, device="meta"))
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
