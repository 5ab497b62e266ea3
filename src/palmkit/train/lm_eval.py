"""Held-out language-model evaluation: loss, perplexity and bits per byte per language."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from palmkit.data.shards import validation_batches
from palmkit.train.config import TrainConfig
from palmkit.train.distributed import Dist, all_reduce


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, corpus: str | Path, langs: list[str], cfg: TrainConfig, d: Dist,
             autocast) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte per language (summed over ranks)."""
    model.eval()
    out: dict[str, float] = {}
    for lang in langs:
        batches, _, bytes_per_token = validation_batches(corpus, lang, cfg.seq_len, cfg.micro_batch,
                                                         cfg.eval_sequences, d.rank, d.world_size)
        total = count = 0.0
        for inputs, targets in batches:
            with autocast:
                _, ce, _ = model(inputs.to(d.device), targets=targets.to(d.device))
            n = int((targets != -100).sum())
            total, count = total + ce.item() * n, count + n
        total, count = all_reduce([total, count], d)
        loss = total / max(count, 1)
        out[f"val/{lang}/loss"] = loss
        out[f"val/{lang}/ppl"] = math.exp(min(loss, 50))
        out[f"val/{lang}/bpb"] = loss / math.log(2) / bytes_per_token
    model.train()
    return out
