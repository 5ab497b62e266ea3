"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685): frozen base weights plus a trainable low-rank
update B @ A on chosen projections, merged into the weights on save.

`write_peft_adapter` also writes the adapters alone in PEFT's format (adapter_config.json,
adapter_model.safetensors) for the base model as `palmkit export` writes it: PEFT's LoRA computes the same
W x + (alpha / r) B A x, so `PeftModel.from_pretrained(exported_base, folder)` is the merged model.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from palmkit.errors import PalmkitError
from palmkit.io import atomic_write_json, save_tensors
from palmkit.model.layouts import hf_state_dict

WRAPPED = "_checkpoint_wrapped_module."  # torch's activation-checkpointing wrapper's child
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + (alpha / r) * B(A(dropout(x))): the base weight is frozen, A and B train."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        # B starts at zero so that training starts from exactly the pretrained function (LoRA section 4.1)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / r) B A: the plain weight that computes what this module computes (without dropout)."""
        return self.base.weight + (self.lora_B @ self.lora_A) * self.scaling


def add_lora(model: nn.Module, rank: int, alpha: float, targets: Sequence[str], dropout: float = 0.0) -> int:
    """Freeze `model` and wrap each nn.Linear named in `targets` (e.g. q_proj, v_proj) in LoRALinear."""
    unknown = set(targets) - set(PROJECTIONS)
    if unknown:
        raise PalmkitError(f"unknown LoRA target(s) {', '.join(sorted(unknown))}; choose from {', '.join(PROJECTIONS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha, dropout))
                wrapped += 1
    if not wrapped:
        raise PalmkitError(f"no projection named {', '.join(targets)} in the model")
    return wrapped


def _lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The model's LoRALinear modules by state-dict name (activation checkpointing's wrapper, which state dicts
    leave out of their keys, left out here too)."""
    return {name.replace(WRAPPED, ""): m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with every LoRALinear folded into a plain `.weight`; the model is left as it is."""
    lora = _lora_modules(model)
    out = {}
    for key, value in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        owner = owner.removesuffix(".base")
        if owner in lora:
            if leaf == "weight":
                out[f"{owner}.weight"] = lora[owner].merged_weight().detach()
        else:
            out[key] = value
    return out


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear holding the merged weight (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                plain = nn.Linear(child.base.in_features, child.base.out_features, bias=False,
                                  device=child.base.weight.device, dtype=child.base.weight.dtype)
                plain.weight.data.copy_(child.merged_weight().detach())
                setattr(module, name, plain)
    return model


ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def peft_adapter(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of the model's LoRA adapters in PEFT's format, under the exported base's names."""
    lora = _lora_modules(model)
    if not lora:
        raise PalmkitError("the model has no LoRA adapters")
    ours = {f"{name}.lora_{part}.weight": getattr(m, f"lora_{part}").detach().float().clone()
            for name, m in lora.items() for part in "AB"}
    # PEFT wraps the transformers model (base_model.model) and stores weights without the adapter's name.
    tensors = {f"base_model.model.{k}": v for k, v in hf_state_dict(ours).items()}
    first = next(iter(lora.values()))
    rank = first.lora_A.shape[0]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": first.scaling * rank,
              "lora_dropout": first.dropout.p, "target_modules": sorted({n.rpartition(".")[2] for n in lora}),
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
              "base_model_name_or_path": None, "revision": None}
    return tensors, config


def write_peft_adapter(folder: str | os.PathLike, model: nn.Module) -> Path:
    """Write the model's LoRA adapters as a PEFT adapter folder for the base model's export."""
    tensors, config = peft_adapter(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tensors(folder / ADAPTER_WEIGHTS, tensors, metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, config)
    return folder
