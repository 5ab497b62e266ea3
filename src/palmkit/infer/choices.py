"""Multiple choice by log-likelihood: a classification task's examples as choice items, and palmkit's scoring.

An item is a prompt, its choices and the index of the right one. The model picks the choice whose continuation
(" " and the choice, after the prompt) it gives the highest total log-probability: lm-evaluation-harness's `acc`
on a `multiple_choice` task. `write_choice_items` writes a task's items as the JSONL that
examples/lm_eval/palmkit_choices.yaml reads, so that the harness (through `palmkit serve`, or on a `palmkit
export` folder) and `score_choices` score the same items. The token split is the harness's: a prompt's trailing
whitespace moves into the continuation, the prompt and the whole text are each encoded as a prompt (BOS by the
tokenizer's rule), and the continuation is the whole text's ids past the prompt's.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from palmkit.data.tasks import load_task
from palmkit.errors import PalmkitError
from palmkit.infer.sampling import token_logprobs
from palmkit.io import atomic_open, jsonl_rows
from palmkit.model.checkpoint import load_checkpoint
from palmkit.model.palm import PaLM
from palmkit.model.tokenizer import Tokenizer

TEMPLATE = "{text}\nAnswer:"  # the prompt of an item; the answers are the task's labels
TARGET_DELIMITER = " "  # between prompt and choice, as the harness's default target_delimiter


def write_choice_items(task: str, out: str = "palmkit_choices.jsonl", split: str = "test", max_items: int = 0,
                       template: str = TEMPLATE, seed: int = 0) -> Path:
    """Write a built-in classification task as multiple-choice items, one JSON object a line.

    Args:
        task: a built-in classification task (sentiment-en, sentiment-fr, tweets-en, ...)
        out: the JSONL file to write: `{"prompt", "choices", "label"}` per line, the label an index into choices
        split: train, valid, test, or all of them
        max_items: at most this many items, the first ones (0: all)
        template: the prompt, with `{text}` for the example's text
        seed: the task's split seed
    """
    data = load_task(task, seed=seed)
    if data.kind != "classify":
        raise PalmkitError(f"{task} is a {data.kind} task; multiple choice needs a classification task")
    examples = [*data.train, *data.valid, *data.test] if split == "all" else data.split(split)
    examples = examples[:max_items] if max_items else examples
    with atomic_open(out, "w", encoding="utf-8") as f:
        for ex in examples:
            item = {"prompt": template.format(text=ex.text), "choices": data.labels,
                    "label": data.labels.index(ex.label)}
            f.write(json.dumps(item, ensure_ascii=False) + "\n")
    return Path(out)


def read_choice_items(path: str | Path) -> list[dict]:
    """The items of a JSONL file as `write_choice_items` writes them, checked."""
    items = []
    for n, item in jsonl_rows(Path(path).read_text(encoding="utf-8"), path):
        try:
            ok = isinstance(item["prompt"], str) and item["prompt"] and len(item["choices"]) >= 2 and \
                0 <= item["label"] < len(item["choices"])
        except (KeyError, TypeError):
            ok = False
        if not ok:
            raise PalmkitError(f"{path}:{n}: expected {{\"prompt\": text, \"choices\": [two or more], \"label\": "
                               f"index}}, got {json.dumps(item, ensure_ascii=False)[:200]}")
        items.append(item)
    return items


def split_continuation(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-evaluation-harness cuts them (module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode_prompt(context + continuation)
    head = tokenizer.encode_prompt(context)
    return head, whole[len(head):]


@torch.no_grad()
def continuation_logprob(model: PaLM, context: Sequence[int], continuation: Sequence[int]) -> float:
    """log p(continuation | context) from one forward pass; a text past the context window loses its start."""
    if not continuation:
        raise PalmkitError("an empty continuation has no log-likelihood")
    ids = [*context, *continuation][-(model.config.max_seq_len + 1):]
    device = model.embed_tokens.weight.device
    logits = model(torch.tensor([ids[:-1]], device=device))[0, -len(continuation):]
    return sum(t.logprob for t in token_logprobs(logits, list(continuation)))


def choice_loglikelihoods(model: PaLM, tokenizer: Tokenizer, items: Sequence[dict]) -> list[list[float]]:
    """For each item, the log-likelihood of each of its choices after its prompt."""
    out = []
    for item in tqdm(items, unit="item", desc="score choices", dynamic_ncols=True):
        pairs = [split_continuation(tokenizer, item["prompt"], TARGET_DELIMITER + c) for c in item["choices"]]
        out.append([continuation_logprob(model, a, b) for a, b in pairs])
    return out


def score_choices(checkpoint: str, items: str = "palmkit_choices.jsonl", device: str = "cpu") -> dict:
    """palmkit's own multiple-choice accuracy on ITEMS: the choice of highest log-likelihood after the prompt.

    Args:
        checkpoint: a checkpoint folder
        items: a JSONL file of items (`palmkit choices write`)
        device: cpu, cuda, ...
    """
    model, tokenizer, _ = load_checkpoint(checkpoint, device=device)
    rows = read_choice_items(items)
    scores = choice_loglikelihoods(model, tokenizer, rows)
    # the first of equal scores, as the harness's argmax
    correct = sum(max(range(len(s)), key=s.__getitem__) == item["label"] for s, item in zip(scores, rows, strict=True))
    return {"accuracy": correct / max(len(rows), 1), "items": len(rows), "correct": correct}
