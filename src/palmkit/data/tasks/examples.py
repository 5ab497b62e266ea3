"""What a fine-tuning example is: labelled text, a tagged sentence or a conversation, and the text it is known by."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, NamedTuple


class LabelledText(NamedTuple):
    """One classification example."""

    text: str
    label: str


class TaggedSentence(NamedTuple):
    """One NER example: words (characters for Chinese and Japanese) and their BIO tags."""

    tokens: list[str]
    tags: list[str]


Conversation = list[dict[str, str]]  # [{"role": "user" | "assistant" | "system", "content": ...}, ...]


def example_key(example: Any) -> str:
    """The text an example is identified by (for deduplication and splitting)."""
    if isinstance(example, LabelledText):
        return example.text
    if isinstance(example, TaggedSentence):
        return "\x1f".join(example.tokens)
    return "\x1e".join(f"{m['role']}\x1f{m['content']}" for m in example)


def bio_labels(types: Iterable[str]) -> list[str]:
    """The tag set of some entity types: O first, then B-/I- of each type."""
    return ["O"] + [f"{p}-{t}" for t in sorted(set(types)) for p in ("B", "I")]


def words_of(text: str, char_level: bool) -> list[tuple[str, int]]:
    """(word, start offset) pairs of raw text as an NER tagger sees it: characters for scripts without
    spaces, else words and single punctuation marks (Twitter handles and hashtags kept whole)."""
    if char_level:
        return [(c, i) for i, c in enumerate(text) if not c.isspace()]
    # clitics split off ("It 's") as in the CoNLL-style training data
    return [(m.group(), m.start()) for m in re.finditer(r"[@#]?\w+|'\w+|[^\w\s]", text)]
