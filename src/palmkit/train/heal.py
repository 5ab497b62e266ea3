"""Healing: a short fine-tune of a compressed model on pretraining data, on the training engine."""

from __future__ import annotations

import os

import torch
from tqdm import tqdm

from palmkit.data.shards import MixtureLoader
from palmkit.errors import PalmkitError
from palmkit.model.palm import PaLM
from palmkit.train.config import EngineConfig
from palmkit.train.distributed import Dist
from palmkit.train.engine import Engine, LRSchedule


def heal(model: PaLM, data: str | os.PathLike, steps: int, lr: float = 3e-4, seq_len: int = 256,
         batch: int = 8, seed: int = 0) -> list[float]:
    """Fine-tune a compressed model for `steps` steps on a corpus's training shards; returns the losses.

    Uses pretraining's loader (palmkit.data.shards), loss, optimiser and schedule on the training engine
    (palmkit.train.engine), in fp32 with bf16 autocast like pretraining, on the model's device.
    """

    loader = MixtureLoader(data, min(seq_len, model.config.max_seq_len), batch, seed=seed)
    vocab = max(int(s.index["vocab_size"]) for s in loader.streams.values())
    if vocab != model.config.vocab_size:
        raise PalmkitError(f"corpus {data} was tokenised with a vocabulary of {vocab}, the model has "
                           f"{model.config.vocab_size}: heal on a corpus built with the model's tokenizer")
    # Pretraining's defaults: AdamW with weight decay 0.1, a 10% warm-up, cosine to 10% of the peak, clip at 1
    engine = Engine(model, EngineConfig(dtype="bfloat16", grad_clip=1.0), Dist(device=model.embed_tokens.weight.device),
                    lr, LRSchedule(max(1, steps // 10), steps, min_ratio=0.1), weight_decay=0.1)
    losses = []
    model.train()
    # The bar counts tokens, so its rate is training tokens/s, as pretraining reports it
    with tqdm(total=steps * batch * loader.seq_len, unit="tok", unit_scale=True, desc="heal", dynamic_ncols=True,
              leave=False) as bar:
        for step in range(steps):
            x, y, _ = loader.next_batch()
            result = engine.train_step([((x, y), y.numel())], _loss, step)
            losses.append(result.losses[1])
            bar.update(x.numel())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def _loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    x, y = batch
    return model(x.to(model.embed_tokens.weight.device), targets=y.to(model.embed_tokens.weight.device))
