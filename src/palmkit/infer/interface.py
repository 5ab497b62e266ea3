"""What the serving engine needs of a model: the interface `PaLM` and the tensor-parallel models all meet."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn

from palmkit.model.palm import KVCache, ModelConfig


@runtime_checkable
class LanguageModel(Protocol):
    """A decoder the engine can prefill and decode with a KV cache (`palmkit.model.palm.PaLM.hidden_states`).

    `config` is the shape of the KV cache this model fills (a tensor-parallel rank's own heads); the engine reads
    the device and dtype of its caches from `embed_tokens.weight`.
    """

    config: ModelConfig

    @property
    def embed_tokens(self) -> nn.Embedding: ...

    def hidden_states(self, idx: torch.Tensor, positions: torch.Tensor | None = None,
                      pad_mask: torch.Tensor | None = None, cache: KVCache | None = None,
                      n_keys: int | None = None) -> torch.Tensor:
        """Final normalised hidden states (B, T, d) of token ids (B, T), writing keys and values into `cache`."""
        ...

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary for hidden states (..., d)."""
        ...
