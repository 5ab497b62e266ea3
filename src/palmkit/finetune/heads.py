"""Task heads on a pretrained PaLM: a sequence classifier and a token classifier (NER)."""

from __future__ import annotations

import torch
from torch import nn

from palmkit.errors import PalmkitError
from palmkit.model.palm import PaLM

HEAD_FILE = "head.safetensors"


def linear_head(model: PaLM, n_labels: int) -> nn.Linear:
    """A head whose logits start near unit scale: the states it reads are LayerNorm outputs."""
    head = nn.Linear(model.config.d_model, n_labels, device=model.embed_tokens.weight.device)
    nn.init.normal_(head.weight, std=model.config.d_model ** -0.5)
    nn.init.zeros_(head.bias)
    return head


class SequenceClassifier(nn.Module):
    """A linear head on one vector per text: the last real token's state (default) or the mean over tokens.

    A causal model's last state is the only one that has read the whole text, which is why it is the default.
    """

    def __init__(self, model: PaLM, n_labels: int, pooling: str = "last", dropout: float = 0.1):
        super().__init__()
        if pooling not in ("last", "mean"):
            raise PalmkitError(f"pooling must be 'last' or 'mean', got {pooling!r}")
        self.model, self.pooling = model, pooling
        self.dropout = nn.Dropout(dropout)
        self.head = linear_head(model, n_labels)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_labels) for right-padded ids (B, T) with true lengths (B,)."""
        h = self.model.hidden_states(ids)  # right padding needs no mask: causality hides it
        if self.pooling == "last":
            pooled = h[torch.arange(len(ids), device=ids.device), lengths - 1]
        else:
            mask = (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).to(h.dtype)
            pooled = (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)
        return self.head(self.dropout(pooled).to(self.head.weight.dtype))  # a bf16 model keeps an fp32 head


class TokenClassifier(nn.Module):
    """A linear head on every position's state (NER tags)."""

    def __init__(self, model: PaLM, n_labels: int, dropout: float = 0.1):
        super().__init__()
        self.model = model
        self.dropout = nn.Dropout(dropout)
        self.head = linear_head(model, n_labels)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, T, n_labels)."""
        return self.head(self.dropout(self.model.hidden_states(ids)).to(self.head.weight.dtype))
