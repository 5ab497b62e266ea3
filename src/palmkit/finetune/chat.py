"""`palmkit finetune chat`: supervised fine-tuning on conversations, the loss on assistant turns only."""

from __future__ import annotations

import math

import torch

from palmkit.data.tasks import subsample
from palmkit.finetune.encode import Item, batches, chat_item, collate
from palmkit.finetune.fit import (
    FinetuneConfig,
    adapt,
    data_source,
    fit,
    metric_name,
    prepare,
    require_examples,
    task_data,
)
from palmkit.model.loss import lm_loss


def _lm_loss(module, ids, lengths, targets):
    return lm_loss(module(ids), targets, module.config.z_loss)[0]


def finetune_chat(checkpoint: str, out: str, task: str = "", train_file: str = "", valid_file: str = "",
                  **options) -> dict:
    """Supervised fine-tuning on conversations in the chat template, with the loss on the assistant's
    replies only; the result is a plain checkpoint (generate, serve, export). User files: JSONL
    {"messages": [{"role", "content"}, ...]}."""
    cfg = FinetuneConfig(**options)
    data = task_data("chat", task, train_file, valid_file, "", "text", "label", cfg.seed)
    model, tokenizer, config = prepare(checkpoint, cfg)
    adapt(model, cfg)
    template = config.get("chat_template")

    def encode(conversations: list) -> list[Item]:
        items = [chat_item(tokenizer, c, cfg.max_len, template) for c in conversations]
        return [it for it in items if any(t != -100 for t in it.target)]  # cut before any reply: nothing to learn

    train = encode(subsample(data.train, cfg.max_train, cfg.seed))
    valid = encode(subsample(data.valid, cfg.max_valid, cfg.seed))
    require_examples(data, train, valid)

    @torch.no_grad()
    def validate() -> dict[str, float]:
        total = count = 0.0
        for batch in batches(valid, cfg.batch_size * 2):
            ids, _, targets = collate(batch, tokenizer.pad_id)
            ce = lm_loss(model(ids), targets, 0.0)[1]
            n = int((targets != -100).sum())
            total, count = total + ce.item() * n, count + n
        loss = total / max(count, 1)
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}

    extra = {"task": "chat", "max_len": cfg.max_len,
             **data_source(data, {"train": train_file, "valid": valid_file})}
    if template:
        extra["chat_template"] = template
    return fit(model, model, tokenizer, train, validate, _lm_loss, cfg, out, metric_name(cfg, "chat"), extra)
