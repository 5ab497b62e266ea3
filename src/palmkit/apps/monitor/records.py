"""Monitor input records (`{"time", "topic", "text", "id"?}` JSON lines) and how a text is scored.

Scoring: each text is cut into sentences and every sentence is classified; the text's score is the share
of its sentences labelled negative (a tweet is usually one sentence, so its score is 0 or 1).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import NamedTuple, Protocol

from palmkit.errors import PalmkitError


class RecordError(PalmkitError):
    """A malformed input line; the message starts with file:line."""


class Record(NamedTuple):
    """One parsed input line."""

    time: datetime  # UTC, naive
    topic: str
    text: str
    id: str | None
    where: str  # file:line


class Labeller(Protocol):
    """What the monitor needs of a classifier (palmkit.finetune.Classifier, or a stub in tests)."""

    labels: list[str]

    def predict(self, texts: Sequence[str]) -> list[tuple[str, dict[str, float]]]: ...


def parse_time(value: str) -> datetime:
    """An ISO-8601 time as naive UTC (zoned times converted, naive ones taken as UTC)."""
    t = datetime.fromisoformat(value)
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def parse_record(raw: bytes, where: str) -> Record:
    """A record from one JSON line; RecordError names `where` (file:line) and what is wrong."""
    try:
        line = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        raise RecordError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{where}: not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in ("time", "topic", "text"):
        if name not in obj:
            raise RecordError(f"{where}: missing field {name!r}")
    topic, text, when, rid = obj["topic"], obj["text"], obj["time"], obj.get("id")
    if not isinstance(topic, str) or not topic.strip():
        raise RecordError(f"{where}: 'topic' must be a non-empty string, got {topic!r}")
    if not isinstance(text, str) or not text.strip():
        raise RecordError(f"{where}: 'text' must be a non-empty string")
    if rid is not None and (not isinstance(rid, str | int) or isinstance(rid, bool)):
        raise RecordError(f"{where}: 'id' must be a string or an integer, got {rid!r}")
    try:
        t = parse_time(when) if isinstance(when, str) else None
    except ValueError:
        t = None
    if t is None:
        raise RecordError(f"{where}: bad time {when!r}: expected ISO-8601 such as 2005-03-14T09:00:00Z")
    return Record(t, topic.strip(), text, None if rid is None else str(rid), where)


# Sentence ends followed by a capital, a digit or an opening quote; news style ("Mr Smith", "US") seldom
# puts a full stop inside a sentence, and a wrong cut costs little: both halves are still classified.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(£$€]?[A-Z0-9])")


def split_parts(text: str, min_words: int = 4) -> list[str]:
    """The sentences of a text (lines first, then sentence ends); fragments under `min_words` words join the
    next sentence, so that a score is never decided by a dangling "he said."."""
    sentences = [s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]
    parts: list[str] = []
    carry = ""
    for s in sentences:
        s = f"{carry} {s}".strip() if carry else s
        if len(s.split()) < min_words:
            carry = s
            continue
        parts.append(s)
        carry = ""
    if carry:
        if parts:
            parts[-1] = f"{parts[-1]} {carry}"
        else:
            parts.append(carry)
    return parts


def negative_scores(classifier: Labeller, texts: Sequence[str], max_parts: int = 0) -> list[float]:
    """Each text's share of sentences labelled negative (its first `max_parts` sentences; 0: all).

    Why sentences and not the whole text: the classifier learnt from tweets (about 16 words), and an article
    cut to its context would be judged on the headline and lead alone, in a form it never saw in training.
    """
    parts = [split_parts(t) or [t.strip()] for t in texts]
    if max_parts:
        parts = [p[:max_parts] for p in parts]
    flat = [s for p in parts for s in p]
    labels = [label for label, _ in classifier.predict(flat)] if flat else []
    out, i = [], 0
    for p in parts:
        out.append(sum(label == "negative" for label in labels[i:i + len(p)]) / len(p))
        i += len(p)
    return out
