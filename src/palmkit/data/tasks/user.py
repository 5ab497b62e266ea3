"""A task from the user's own files: CSV or JSONL rows, CoNLL for NER, JSONL conversations for chat."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from palmkit.data.tasks.examples import LabelledText, TaggedSentence, bio_labels
from palmkit.data.tasks.readers import clean, conll_examples, read_text
from palmkit.data.tasks.splits import TaskData, split_examples
from palmkit.errors import PalmkitError


def user_examples(path: str | os.PathLike, kind: str, text_field: str = "text", label_field: str = "") -> list:
    """Examples of a user file: CSV or JSONL rows for classification, JSONL {tokens, tags} or CoNLL for
    NER, JSONL {messages: [...]} (or a bare list of messages) for chat. label_field: "label" or "tags" by default."""
    path = Path(path)
    label_field = label_field or ("tags" if kind == "ner" else "label")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if kind == "ner" and path.suffix not in (".jsonl", ".json"):
        return conll_examples(path)
    rows = _read_rows(path)
    out = []
    for i, row in enumerate(rows, 1):
        try:
            if kind == "classify":
                out.append(LabelledText(clean(str(row[text_field])), str(row[label_field]).strip()))
            elif kind == "ner":
                tokens, tags = list(row["tokens"]), list(row[label_field])
                if len(tokens) != len(tags):
                    raise PalmkitError(f"{len(tokens)} tokens but {len(tags)} tags")
                out.append(TaggedSentence(tokens, tags))
            else:
                messages = row["messages"] if isinstance(row, dict) else row
                out.append([{"role": m["role"], "content": m["content"]} for m in messages])
        except (KeyError, TypeError, ValueError) as exc:
            raise PalmkitError(f"{path}: row {i}: {exc.__class__.__name__}: {exc} (fields: --text_field "
                               f"{text_field!r}, --label_field {label_field!r})") from None
    return out


def _read_rows(path: Path) -> list:
    text = read_text(path)
    if path.suffix in {".csv", ".tsv"}:
        return list(csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv" else ","))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise PalmkitError(f"{path}: line {n} is not JSON: {exc}") from None
    return rows


def load_user_task(kind: str, train_file: str, valid_file: str = "", test_file: str = "", text_field: str = "text",
                   label_field: str = "", seed: int = 0, name: str = "user") -> TaskData:
    """A task from user files; a missing valid or test file is cut from the training file by hash."""
    train = user_examples(train_file, kind, text_field, label_field)
    given = {"valid": valid_file, "test": test_file}
    data = {s: user_examples(f, kind, text_field, label_field) for s, f in given.items() if f}
    if len(data) < 2:
        cut = split_examples(train, seed, valid=0.0 if "valid" in data else 0.1, test=0.0 if "test" in data else 0.1)
        train = cut["train"]
        data = {s: data.get(s, cut[s]) for s in ("valid", "test")}
    if kind == "classify":
        labels = sorted({ex.label for part in (train, *data.values()) for ex in part})
    elif kind == "ner":
        labels = bio_labels(t[2:] for part in (train, *data.values()) for ex in part for t in ex.tags if t != "O")
    else:
        labels = []
    return TaskData(name, kind, "", labels, train, data["valid"], data["test"])
