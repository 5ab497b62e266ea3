"""`palmkit finetune classify`: a text classifier (full fine-tuning or LoRA)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from palmkit.data.tasks import LabelledText, TaskData, TaskFiles
from palmkit.errors import PalmkitError
from palmkit.finetune.encode import Item, encode_text
from palmkit.finetune.fit import FinetuneConfig, Objective, encode_splits, fit, metric_name, start
from palmkit.finetune.heads import SequenceClassifier
from palmkit.finetune.predict import predict_logits
from palmkit.finetune.scores import classification_scores
from palmkit.model.tokenizer import Tokenizer


def _check_labels(data: TaskData, examples: list[LabelledText]) -> None:
    unknown = sorted({ex.label for ex in examples} - set(data.labels))
    if unknown:
        raise PalmkitError(f"label(s) {', '.join(unknown)} not among the task's labels {data.labels}")


def classify_items(tokenizer: Tokenizer, examples: Sequence[LabelledText], labels: Sequence[str],
                   max_len: int) -> list[Item]:
    """Encoded classification examples."""
    index = {label: i for i, label in enumerate(labels)}
    return [Item(encode_text(tokenizer, ex.text, max_len), index[ex.label]) for ex in examples]


def _classify_loss(module, ids, lengths, targets):
    return F.cross_entropy(module(ids, lengths), targets)


def finetune_classify(checkpoint: str, out: str, data: TaskFiles = TaskFiles(),
                      pooling: Literal["last", "mean"] = "last", train: FinetuneConfig = FinetuneConfig(),
                      force: bool = False, resume: bool = False, device: str = "") -> dict:
    """Fine-tune a text classifier (a linear head on the pretrained model); returns the best validation scores.

    OUT ends up holding the checkpoint that did best on validation, with metrics.jsonl, learning_curve.png and
    valid_metric.png.

    Args:
        checkpoint: pretrained checkpoint folder to start from
        out: folder of the fine-tuned classifier
        data: the examples: a built-in task (--data.task sentiment-en) or your own files (--data.train_file, a
            text and a label per record)
        pooling: what the head reads: the hidden state of the last token, or the mean over the tokens
        train: training options
        force: write into OUT even when it holds other files: the model's files are replaced, the others kept
            (without it such a folder is refused before training, never deleted)
        resume: continue exactly where the training checkpoints in OUT stopped (OUT/checkpoints, written at each
            validation): the same options as the interrupted run; from scratch when there is none
        device: cpu or cuda (under torchrun each process takes the GPU of its LOCAL_RANK); "": cuda when there
            is one
    """
    cfg = train
    job = start("classify", checkpoint, cfg, data, device)
    task, model, tokenizer = job.data, job.model, job.tokenizer
    _check_labels(task, task.train + task.valid)
    module = SequenceClassifier(model, len(task.labels), pooling, cfg.dropout)
    items, valid, _ = encode_splits(task, cfg, lambda ex: classify_items(tokenizer, ex, task.labels, cfg.max_len))

    def validate() -> dict[str, float]:
        logits = torch.stack(predict_logits(module, valid, tokenizer.pad_id, cfg.batch_size * 2))
        y = torch.tensor([it.target for it in valid])
        return {"loss": F.cross_entropy(logits, y).item(),
                **classification_scores(y.tolist(), logits.argmax(-1).tolist(), len(task.labels))}

    extra = {"task": "classify", "labels": task.labels, "pooling": pooling, "max_len": cfg.max_len, **job.source}
    objective = Objective(items, _classify_loss, validate, metric_name(cfg, "classify"), extra, task.rejected)
    return fit(module, model, tokenizer, objective, cfg, out, force, resume, device)
