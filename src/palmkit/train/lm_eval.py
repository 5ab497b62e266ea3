"""Held-out language-model evaluation: loss, perplexity and bits per byte per language."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path

import torch

from palmkit.data.shards import validation_batches
from palmkit.train.config import TrainConfig
from palmkit.train.distributed import Dist, all_reduce


@torch.no_grad()
def mean_lm_loss(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                 device: torch.device | str | None = None, autocast=None) -> tuple[float, int]:
    """(mean cross-entropy per target token, number of target tokens) of `model` over (inputs, targets) batches.

    Targets of -100 (padding, masked turns) do not count. Each batch's mean is weighted by its number of
    targets, so the result is the mean over all tokens whatever the batch sizes. No z-loss: it is a training
    regulariser (PaLM section 5), not part of the model's likelihood.
    """
    total, count = 0.0, 0
    for inputs, targets in batches:
        with autocast or contextlib.nullcontext():
            _, ce, _ = model(inputs.to(device), targets=targets.to(device))
        n = int((targets != -100).sum())
        total, count = total + ce.item() * n, count + n
    return total / max(count, 1), count


@torch.no_grad()
def evaluate_lm(model: torch.nn.Module, corpus: str | Path, langs: list[str], cfg: TrainConfig, d: Dist,
             autocast) -> dict[str, float]:
    """Held-out loss, perplexity and bits per byte per language (summed over ranks)."""
    model.eval()
    out: dict[str, float] = {}
    for lang in langs:
        batches, _, bytes_per_token = validation_batches(corpus, lang, cfg.seq_len, cfg.micro_batch,
                                                         cfg.eval_sequences, d.rank, d.world_size)
        loss, n = mean_lm_loss(model, batches, d.device, autocast)
        total, count = all_reduce([loss * n, n], d)
        loss = total / max(count, 1)
        out[f"val/{lang}/loss"] = loss
        out[f"val/{lang}/ppl"] = math.exp(min(loss, 50))
        out[f"val/{lang}/bpb"] = loss / math.log(2) / bytes_per_token
    model.train()
    return out
