"""`palmkit finetune ner`: a named-entity tagger (BIO)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from palmkit.data.tasks import TaggedSentence, TaskFiles
from palmkit.finetune.encode import Item, align_words
from palmkit.finetune.fit import FinetuneConfig, Objective, encode_splits, fit, metric_name, start
from palmkit.finetune.heads import TokenClassifier
from palmkit.finetune.predict import predict_logits, word_tags
from palmkit.finetune.scores import entity_scores
from palmkit.model.tokenizer import Tokenizer


def ner_items(tokenizer: Tokenizer, sentences: Sequence[TaggedSentence], labels: Sequence[str], max_len: int,
              char_level: bool, echo: bool = False) -> list[Item]:
    """Encoded NER sentences (tags on first pieces)."""
    index = {label: i for i, label in enumerate(labels)}
    return [align_words(tokenizer, s.tokens, [index[t] for t in s.tags], max_len, char_level, echo)
            for s in sentences]


def _token_loss(module, ids, lengths, targets):
    logits = module(ids, lengths)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


def finetune_ner(checkpoint: str, out: str, data: TaskFiles = TaskFiles(), char_level: bool = False,
                 context: Literal["causal", "echo"] = "causal", train: FinetuneConfig = FinetuneConfig(),
                 force: bool = False, resume: bool = False, device: str = "") -> dict:
    """Fine-tune a named-entity tagger (BIO tags, a linear head on every token); returns the best validation scores.

    OUT ends up holding the checkpoint that did best on validation, with metrics.jsonl, learning_curve.png and
    valid_metric.png.

    Args:
        checkpoint: pretrained checkpoint folder to start from
        out: folder of the fine-tuned tagger
        data: the sentences: a built-in task (--data.task ner-zh) or your own files (--data.train_file: CoNLL, or
            {"tokens": [...], "tags": [...]} records; numbered tags: --data.label_field ner_tags
            --data.label_names O,B-PER,I-PER,...)
        char_level: one token per character, for scripts written without spaces
        context: causal: each token's tag sees only the words before it; echo: the sentence is fed twice and
            the tags read the second copy, so that every tag sees the whole sentence
        train: training options
        force: write into OUT even when it holds other files: the model's files are replaced, the others kept
            (without it such a folder is refused before training, never deleted)
        resume: continue exactly where the training checkpoints in OUT stopped (OUT/checkpoints, written at each
            validation): the same options as the interrupted run; from scratch when there is none
        device: cpu or cuda (under torchrun each process takes the GPU of its LOCAL_RANK); "": cuda when there
            is one
    """
    cfg = train
    job = start("ner", checkpoint, cfg, data, device)
    task, model, tokenizer = job.data, job.model, job.tokenizer
    char_level = task.char_level or char_level
    echo = context == "echo"
    module = TokenClassifier(model, len(task.labels), cfg.dropout)
    items, valid, valid_ex = encode_splits(task, cfg, lambda ex: ner_items(tokenizer, ex, task.labels, cfg.max_len,
                                                                           char_level, echo))

    def validate() -> dict[str, float]:
        logits = predict_logits(module, valid, tokenizer.pad_id, cfg.batch_size * 2)
        flat = torch.cat(logits)
        targets = torch.tensor([t for it in valid for t in it.target])
        scores = entity_scores([s.tags for s in valid_ex], word_tags(logits, valid, task.labels))["micro"]
        return {"loss": F.cross_entropy(flat, targets, ignore_index=-100).item(), "f1": scores["f1"],
                "precision": scores["precision"], "recall": scores["recall"]}

    extra = {"task": "ner", "labels": task.labels, "char_level": char_level, "context": context,
             "max_len": cfg.max_len, **job.source}
    objective = Objective(items, _token_loss, validate, metric_name(cfg, "ner"), extra, task.rejected)
    return fit(module, model, tokenizer, objective, cfg, out, force, resume, device)
