"""`palmkit finetune chat`: supervised fine-tuning on conversations, the loss on assistant turns only."""

from __future__ import annotations

import math

from palmkit.data.tasks import TaskFiles
from palmkit.finetune.encode import chat_items, lm_batches
from palmkit.finetune.fit import FinetuneConfig, Objective, encode_splits, fit, metric_name, start
from palmkit.train.lm_eval import mean_lm_loss


def _lm_loss(module, ids, lengths, targets):
    return module(ids, targets=targets)[0]  # through forward, which DDP wraps: the loss with the model's z-loss


def finetune_chat(checkpoint: str, out: str, data: TaskFiles = TaskFiles(), train: FinetuneConfig = FinetuneConfig(),
                  force: bool = False, resume: bool = False, device: str = "") -> dict:
    """Supervised fine-tuning on conversations; returns the best validation scores.

    The conversations are written in the chat template and the loss counts the assistant's replies only. OUT
    ends up holding a plain checkpoint (for generate, serve, export): the one that did best on validation.

    Args:
        checkpoint: pretrained checkpoint folder to start from
        out: folder of the tuned model
        data: the conversations: a built-in task (--data.task dialogue-en) or your own files (--data.train_file,
            --data.valid_file)
        train: training options
        force: write into OUT even when it holds other files: the model's files are replaced, the others kept
            (without it such a folder is refused before training, never deleted)
        resume: continue exactly where the training checkpoints in OUT stopped (OUT/checkpoints, written at each
            validation): the same options as the interrupted run; from scratch when there is none
        device: cpu or cuda (under torchrun each process takes the GPU of its LOCAL_RANK); "": cuda when there
            is one
    """
    cfg = train
    job = start("chat", checkpoint, cfg, data, device)
    model, tokenizer, template = job.model, job.tokenizer, job.config.get("chat_template")
    items, valid, _ = encode_splits(job.data, cfg, lambda ex: chat_items(tokenizer, ex, cfg.max_len, template))

    def validate() -> dict[str, float]:
        loss, _ = mean_lm_loss(model, lm_batches(valid, cfg.batch_size * 2, tokenizer.pad_id),
                               model.embed_tokens.weight.device)
        return {"loss": loss, "ppl": math.exp(min(loss, 50))}

    extra = {"task": "chat", "max_len": cfg.max_len, **job.source}
    if template:
        extra["chat_template"] = template
    objective = Objective(items, _lm_loss, validate, metric_name(cfg, "chat"), extra, job.data.rejected)
    return fit(model, model, tokenizer, objective, cfg, out, force, resume, device)
