"""Healing: a short fine-tune of a compressed model on pretraining data, with the pretraining step."""

from __future__ import annotations

import os

import torch

from palmkit.data.shards import MixtureLoader
from palmkit.errors import PalmkitError
from palmkit.model.palm import PaLM
from palmkit.train.config import TrainConfig
from palmkit.train.step import compute_autocast, forward_backward, lr_factor, make_optimizer, optimizer_step


def heal(model: PaLM, data: str | os.PathLike, steps: int, lr: float = 3e-4, seq_len: int = 256,
         batch: int = 8, seed: int = 0) -> list[float]:
    """Fine-tune a compressed model for `steps` steps on a corpus's training shards; returns the losses.

    Uses palmkit.train's loader, loss, optimiser and schedule, in fp32 with bf16 autocast like pretraining.
    """

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
