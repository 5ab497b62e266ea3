"""`palmkit finetune chat`: supervised fine-tuning on conversations, the loss on assistant turns only."""

from __future__ import annotations

import math

from palmkit.finetune.encode import chat_items, lm_batches
from palmkit.finetune.fit import FinetuneConfig, encode_splits, fit, metric_name, start
from palmkit.train.lm_eval import mean_lm_loss


def _lm_loss(module, ids, lengths, targets):
    return module(ids, targets=targets)[0]  # through forward, which DDP wraps: the loss with the model's z-loss


def finetune_chat(checkpoint: str, out: str, task: str = "", train_file: str = "", valid_file: str = "",
                  train: FinetuneConfig = FinetuneConfig(),
                  force: bool = False, resume: bool = False, device: str = "") -> dict:
    """Supervised fine-tuning on conversations; returns the best validation scores.

    The conversations are written in the chat template and the loss counts the assistant's replies only. OUT
    ends up holding a plain checkpoint (for generate, serve, export): the one that did best on validation.

    Args:
        checkpoint: pretrained checkpoint folder to start from
        out: folder of the tuned model
        task: a built-in task (dialogue-en), or give train_file instead
        train_file: your own conversations, JSONL or a JSON array of {"messages": [{"role": ..., "content": ...},
            ...]} or of TRL's {"prompt": ..., "completion": ...} (strings, or lists of messages)
        valid_file: validation conversations (default: a seeded 10% of train_file)
        train: training options
        force: write into OUT even when it holds other files: the model's files are replaced, the others kept
            (without it such a folder is refused before training, never deleted)
        resume: continue exactly where the training checkpoints in OUT stopped (OUT/checkpoints, written at each
            validation): the same options as the interrupted run; from scratch when there is none
        device: cpu or cuda (under torchrun each process takes the GPU of its LOCAL_RANK); "": cuda when there
            is one
    """
    cfg = train
    job = start("chat", checkpoint, cfg, task, {"train": train_file, "valid": valid_file}, device)
    model, tokenizer, template = job.model, job.tokenizer, job.config.get("chat_template")
    items, valid, _ = encode_splits(job.data, cfg, lambda ex: chat_items(tokenizer, ex, cfg.max_len, template))

    def validate() -> dict[str, float]:
        loss, _ = mean_lm_loss(model, lm_batches(valid, cfg.batch_size * 2, tokenizer.pad_id),
                               model.embed_tokens.weight.device)
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}

    extra = {"task": "chat", "max_len": cfg.max_len, **job.source}
    if template:
        extra["chat_template"] = template
    return fit(model, model, tokenizer, items, validate, _lm_loss, cfg, out, metric_name(cfg, "chat"), extra, force,
               resume, device, job.data.rejected)
