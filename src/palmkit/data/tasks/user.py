"""A task from the user's own files: CSV, JSONL, a JSON array of records or Parquet, CoNLL for NER, conversations
for chat. Duplicates and texts given two labels are reported by file and line (`screen`), never dropped silently.

Records come in the shapes other tools export: `{"messages": [...]}` or TRL's `{"prompt", "completion"}` (strings,
or lists of messages) for chat; labels as names or as class numbers, and NER tags as names or as numbers (as
Hugging Face datasets store `ner_tags`), numbers being read through a list of names (`label_names`). A record that
does not fit is reported by file and line, with the fields it does have.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from palmkit.data.tasks.examples import Conversation, LabelledText, TaggedSentence, bio_labels, example_key
from palmkit.data.tasks.readers import clean, conll_examples, read_text
from palmkit.data.tasks.splits import TaskData, split_examples
from palmkit.errors import PalmkitError
from palmkit.io import jsonl_rows, split_list

ROLES = ("system", "user", "assistant")


class RecordError(ValueError):
    """A record that does not fit the task; user_examples adds where it is and what fields it has."""


def user_examples(path: str | os.PathLike, kind: str, text_field: str = "text", label_field: str = "",
                  label_names: Sequence[str] | str = ()) -> list:
    """Examples of a user file: CSV, Parquet or JSON records for classification, JSON or Parquet {tokens, tags} or
    CoNLL for NER, JSON or Parquet {messages: [...]}, {prompt, completion} or a bare list of messages for chat.
    JSON is one record per line (JSONL) or one array of records. label_field: "label" or "tags" by default;
    label_names: the name of each class number (or tag number), where labels are numbers."""
    return [ex for _, ex in numbered_examples(path, kind, text_field, label_field, label_names)]


def numbered_examples(path: str | os.PathLike, kind: str, text_field: str = "text", label_field: str = "",
                      label_names: Sequence[str] | str = ()) -> list[tuple[int, Any]]:
    """`user_examples` with the line (CSV, JSON, CoNLL) or row (Parquet) each example starts on."""
    path = Path(path)
    label_field = label_field or ("tags" if kind == "ner" else "label")
    names = split_list(label_names) if label_names else []
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if kind == "ner" and path.suffix not in (".jsonl", ".json", ".parquet"):
        return list(zip(_sentence_lines(path), conll_examples(path), strict=True))
    out: list[tuple[int, Any]] = []
    for line, row in read_records(path):
        try:
            if kind == "classify":
                out.append((line, LabelledText(clean(str(_field(row, text_field, "--text_field"))),
                                               _name(_field(row, label_field, "--label_field"), names, "label"))))
            elif kind == "ner":
                tokens = _field(row, "tokens", "tokens")
                tags = _field(row, label_field, "--label_field")
                if not isinstance(tokens, list) or not isinstance(tags, list):
                    raise RecordError(f"'tokens' and {label_field!r} must be lists")
                if len(tokens) != len(tags):
                    raise RecordError(f"{len(tokens)} tokens but {len(tags)} tags")
                out.append((line, TaggedSentence([str(t) for t in tokens], [_name(t, names, "tag") for t in tags])))
            else:
                out.append((line, conversation(row)))
        except RecordError as exc:
            fields = f"; the record has fields {', '.join(map(repr, row))}" if isinstance(row, dict) else ""
            raise PalmkitError(f"{path}:{line}: {exc}{fields}") from None
    return out


def _sentence_lines(path: Path) -> list[int]:
    """The line each sentence of a CoNLL file starts on (as conll_examples splits them)."""
    starts, inside = [], False
    for n, line in enumerate(read_text(path).splitlines(), 1):
        line = line.strip()
        words = len(line.split("\t") if "\t" in line else line.split()) >= 2
        if words and not inside:
            starts.append(n)
        inside = words
    return starts


def _field(row: Any, name: str, option: str) -> Any:
    if not isinstance(row, dict):
        raise RecordError(f"a record must be an object with named fields, got {type(row).__name__}")
    if name not in row:
        raise RecordError(f"no field {name!r}" + (f" (set by {option})" if option.startswith("--") else ""))
    return row[name]


def _name(value: Any, names: list[str], what: str) -> str:
    """A label or tag as its name: a string as it is, a number through `names`."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise RecordError(f"a {what} must be a string or a number, got {json.dumps(value)[:40]}")
    if isinstance(value, str) and not (names and value.strip().lstrip("-").isdigit()):
        return value.strip()
    number = int(value)
    if not names:
        if what == "tag":
            raise RecordError(f"{what} {number} is a number: give the name of each (--label_names O,B-PER,I-PER,...)")
        return str(number)
    if not 0 <= number < len(names):
        raise RecordError(f"{what} {number} is out of range for the {len(names)} names of --label_names")
    return names[number]


def conversation(row: Any) -> Conversation:
    """A chat record as messages: {messages: [...]}, TRL's {prompt, completion} (strings or message lists), or a
    bare list of messages."""
    if isinstance(row, dict) and "messages" in row:
        return _messages(row["messages"], "messages")
    if isinstance(row, dict) and "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        return _messages(prompt, "prompt") + _messages(completion, "completion")
    if isinstance(row, list):
        return _messages(row, "record")
    raise RecordError("a conversation needs 'messages', or 'prompt' and 'completion'")


def _messages(value: Any, where: str) -> Conversation:
    if not isinstance(value, list):
        raise RecordError(f"{where!r} must be a list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise RecordError(f"{where}[{i}] must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}, "
                              f"got {json.dumps(m, ensure_ascii=False)[:80]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def read_records(path: Path) -> list[tuple[int, Any]]:
    """(line number, record) pairs of a CSV/TSV file, a JSON array, or JSON Lines; (row number, record) of a
    Parquet file, numbered from 1 as `palmkit corpus build` numbers its rows."""
    if path.suffix == ".parquet":
        try:
            batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
            return list(enumerate((row for b in batches for row in b.to_pylist()), 1))
        except (pa.ArrowInvalid, OSError) as exc:
            raise PalmkitError(f"{path}: not a readable Parquet file: {exc}") from None
    text = read_text(path)
    if path.suffix in {".csv", ".tsv"}:
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if path.suffix == ".tsv" else ",")
        return [(reader.line_num, row) for row in reader]  # line_num: where the row just read ends
    if text.lstrip().startswith("["):
        return _json_array(path, text)
    return list(jsonl_rows(text, path))


def _json_array(path: Path, text: str) -> list[tuple[int, Any]]:
    """The elements of a JSON array, each with the line it starts on."""
    decoder = json.JSONDecoder()
    rows, at = [], text.index("[") + 1
    try:
        while True:
            while at < len(text) and text[at] in " \t\r\n,":
                at += 1
            if at < len(text) and text[at] == "]":
                return rows
            value, end = decoder.raw_decode(text, at)
            rows.append((text.count("\n", 0, at) + 1, value))
            at = end
    except json.JSONDecodeError as exc:
        raise PalmkitError(f"{path}:{exc.lineno}: not a JSON array of records: {exc.msg}") from None


def _target(example: Any) -> Any:
    return example.label if isinstance(example, LabelledText) else tuple(getattr(example, "tags", ()))


def screen(files: dict[str, list[tuple[int, Any]]]) -> tuple[dict[str, list], list[dict]]:
    """(examples kept per file, rejected records) of numbered examples from several files.

    A text given two different labels (or tag sequences) is rejected in every copy: which one is right cannot be
    told. A repeated text is kept once: where it first appears, the evaluation files before the training file
    (a text both trained on and tested on would flatter the test). Each rejected record names its file and line.
    """
    targets: dict[str, set] = {}
    for rows in files.values():
        for _, ex in rows:
            targets.setdefault(example_key(ex), set()).add(_target(ex))
    first: dict[str, str] = {}
    kept: dict[str, list] = {f: [] for f in files}
    rejected = []
    for f, rows in files.items():
        for line, ex in rows:
            key = example_key(ex)
            where = f"{f}:{line}"
            if len(targets[key]) > 1:
                labels = sorted(map(str, targets[key]))
                rejected.append({"where": where, "reason": "conflict", "detail": f"given {len(labels)} labels: "
                                 + ", ".join(labels[:4]), "text": key[:200]})
            elif key in first:
                rejected.append({"where": where, "reason": "duplicate", "detail": f"first at {first[key]}",
                                 "text": key[:200]})
            else:
                first[key] = where
                kept[f].append(ex)
    return kept, rejected


def load_user_task(kind: str, train_file: str, valid_file: str = "", test_file: str = "", text_field: str = "text",
                   label_field: str = "", seed: int = 0, name: str = "user",
                   label_names: Sequence[str] | str = ()) -> TaskData:
    """A task from user files; a missing valid or test file is cut from the training file by hash. label_names:
    the names of class (or tag) numbers, which are also the classes' order. Duplicates and texts given two
    labels are left out and listed in the task's `rejected` records (see `screen`)."""
    given = {"test": test_file, "valid": valid_file, "train": train_file}
    numbered = {f: numbered_examples(f, kind, text_field, label_field, label_names) for f in given.values() if f}
    kept, rejected = screen(numbered)
    train = kept[train_file]
    data = {s: kept[f] for s, f in given.items() if f and s != "train"}
    if len(data) < 2:
        cut = split_examples(train, seed, valid=0.0 if "valid" in data else 0.1, test=0.0 if "test" in data else 0.1)
        train = cut["train"]
        data = {s: data.get(s, cut[s]) for s in ("valid", "test")}
    names = split_list(label_names) if label_names else []
    if kind == "classify":
        seen = {ex.label for part in (train, *data.values()) for ex in part}
        labels = names + sorted(seen - set(names)) if names else sorted(seen)
    elif kind == "ner":
        labels = bio_labels(t[2:] for part in (train, *data.values()) for ex in part for t in ex.tags if t != "O")
    else:
        labels = []
    return TaskData(name, kind, "", labels, train, data["valid"], data["test"], rejected=rejected)
