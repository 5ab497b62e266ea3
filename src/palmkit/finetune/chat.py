"""`palmkit finetune chat`: supervised fine-tuning on conversations, the loss on assistant turns only."""

from __future__ import annotations

import math

from palmkit.data.tasks import subsample
from palmkit.finetune.encode import chat_items, lm_batches
from palmkit.finetune.fit import (
    FinetuneConfig,
    data_source,
    fit,
    metric_name,
    prepare,
    require_examples,
    task_data,
)
from palmkit.model.loss import lm_loss
from palmkit.train.lm_eval import mean_lm_loss


def _lm_loss(module, ids, lengths, targets):
    return lm_loss(module(ids), targets, module.config.z_loss)[0]


def finetune_chat(checkpoint: str, out: str, task: str = "", train_file: str = "", valid_file: str = "",
                  train: FinetuneConfig = FinetuneConfig()) -> dict:
    """Supervised fine-tuning on conversations; returns the best validation scores.

    The conversations are written in the chat template and the loss counts the assistant's replies only. OUT
    ends up holding a plain checkpoint (for generate, serve, export): the one that did best on validation.

    Args:
        checkpoint: pretrained checkpoint folder to start from
        out: folder of the tuned model
        task: a built-in task (dialogue-en), or give train_file instead
        train_file: your own conversations, JSONL {"messages": [{"role": ..., "content": ...}, ...]}
        valid_file: validation conversations (default: a seeded 10% of train_file)
        train: training options
    """
    cfg = train
    data = task_data("chat", task, train_file, valid_file, "", "text", "label", cfg.seed)
    model, tokenizer, config = prepare(checkpoint, cfg)
    template = config.get("chat_template")

    items = chat_items(tokenizer, subsample(data.train, cfg.max_train, cfg.seed), cfg.max_len, template)
    valid = chat_items(tokenizer, subsample(data.valid, cfg.max_valid, cfg.seed), cfg.max_len, template)
    require_examples(data, items, valid)

    def validate() -> dict[str, float]:
        loss, _ = mean_lm_loss(model, lm_batches(valid, cfg.batch_size * 2, tokenizer.pad_id))
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}

    extra = {"task": "chat", "max_len": cfg.max_len,
             **data_source(data, {"train": train_file, "valid": valid_file})}
    if template:
        extra["chat_template"] = template
    return fit(model, model, tokenizer, items, validate, _lm_loss, cfg, out, metric_name(cfg, "chat"), extra)
