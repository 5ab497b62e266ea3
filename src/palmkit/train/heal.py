"""Healing: a short fine-tune of a compressed model on pretraining data, with the pretraining step."""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from palmkit.data.shards import MixtureLoader
from palmkit.errors import PalmkitError
from palmkit.model.palm import PaLM
from palmkit.train.step import compute_autocast, forward_backward, lr_factor, make_optimizer, optimizer_step


def heal(model: PaLM, data: str | os.PathLike, steps: int, lr: float = 3e-4, seq_len: int = 256,
         batch: int = 8, seed: int = 0) -> list[float]:
    """Fine-tune a compressed model for `steps` steps on a corpus's training shards; returns the losses.

    Uses pretraining's loader (palmkit.data.shards), loss, optimiser and schedule (palmkit.train.step), in fp32
    with bf16 autocast like pretraining.
    """

    loader = MixtureLoader(data, min(seq_len, model.config.max_seq_len), batch, seed=seed)
    vocab = max(int(s.index["vocab_size"]) for s in loader.streams.values())
    if vocab != model.config.vocab_size:
        raise PalmkitError(f"corpus {data} was tokenised with a vocabulary of {vocab}, the model has "
                           f"{model.config.vocab_size}: heal on a corpus built with the model's tokenizer")
    # Pretraining's defaults: AdamW with weight decay 0.1, a 10% warm-up, cosine to 10% of the peak, clip at 1
    optimizer = make_optimizer(model, lr, weight_decay=0.1)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps, min_ratio=0.1))
    autocast = compute_autocast(torch.device("cpu"), torch.bfloat16)
    losses = []
    model.train()
    # The bar counts tokens, so its rate is training tokens/s, as pretraining reports it
    with tqdm(total=steps * batch * loader.seq_len, unit="tok", unit_scale=True, desc="heal", dynamic_ncols=True,
              leave=False) as bar:
        for _ in range(steps):
            x, y, _ = loader.next_batch()
            losses.append(float(forward_backward(model, x, y, autocast)[1]))
            optimizer_step(model, optimizer, grad_clip=1.0)
            schedule.step()
            bar.update(x.numel())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses
