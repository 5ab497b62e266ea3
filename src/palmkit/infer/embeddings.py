"""Text embeddings from a decoder: the mean of its final normalised hidden states over a text's tokens, scaled to
unit length.

Mean pooling over every position (BOS included) rather than the last token's state: a causal decoder's last state
is shaped to predict the next token, while the mean weighs the whole text (Sentence-BERT, Reimers and Gurevych
2019, section 3; the same choice as llama.cpp's default `--pooling mean` for decoder models). Each text runs alone
(B=1, no padding), so a text's embedding is the same whatever else is in the request or the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from palmkit.infer.interface import LanguageModel


@torch.inference_mode()
def embed(model: LanguageModel, ids: Sequence[int]) -> torch.Tensor:
    """The unit-length float32 embedding (d,) of one token sequence."""
    device = model.embed_tokens.weight.device
    h = model.hidden_states(torch.tensor([list(ids)], dtype=torch.long, device=device))[0].float()
    return torch.nn.functional.normalize(h.mean(0), dim=0).cpu()
