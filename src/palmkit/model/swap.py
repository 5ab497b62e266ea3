"""Finding the linear layers of a model and swapping them for other modules (int8, low-rank, packed)."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner), leaf, module)


def linear_names(model: nn.Module, targets: Iterable[str] = ("self_attn", "mlp")) -> list[str]:
    """Names of the nn.Linear layers inside blocks whose path contains one of `targets`."""
    targets = tuple(targets)
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and any(f".{t}." in f".{name}." for t in targets)]
