"""Train/valid/test splits that never change: deduplication, a seeded hash per example, seeded subsamples.

A split is a pure function of each example's text, so it is the same on every run and machine, and exact
duplicates always land in the same split: no test text can leak into training.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from palmkit.data.tasks.examples import LabelledText, example_key

SPLIT_NAMES = ("train", "valid", "test")


@dataclass
class TaskData:
    """A task's examples split three ways, with its label set."""

    name: str
    kind: str
    lang: str
    labels: list[str]
    train: list = field(default_factory=list)
    valid: list = field(default_factory=list)
    test: list = field(default_factory=list)
    char_level: bool = False
    rejected: list[dict] = field(default_factory=list)
    """records of the user's files left out: {"where": FILE:LINE, "reason": duplicate or conflict, "detail",
    "text"}"""

    def split(self, name: str) -> list:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]


def split_of(key: str, seed: int = 0, valid: float = 0.1, test: float = 0.1) -> str:
    """The split of an example, from a seeded hash of its text: the same text always lands in the same split."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    return "test" if u < test else "valid" if u < test + valid else "train"


def deduplicate_examples(examples: list) -> list:
    """Keep the first copy of each text; a text given two different labels is dropped altogether."""
    labels: dict[str, set] = {}
    for ex in examples:
        if isinstance(ex, LabelledText):
            labels.setdefault(ex.text, set()).add(ex.label)
    seen, out = set(), []
    for ex in examples:
        key = example_key(ex)
        if key in seen or (isinstance(ex, LabelledText) and len(labels[key]) > 1):
            continue
        seen.add(key)
        out.append(ex)
    return out


def split_examples(examples: list, seed: int = 0, valid: float = 0.1, test: float = 0.1) -> dict[str, list]:
    """Deduplicate, then assign each example to train/valid/test by `split_of` (order kept within a split)."""
    out: dict[str, list] = {s: [] for s in SPLIT_NAMES}
    for ex in deduplicate_examples(examples):
        out[split_of(example_key(ex), seed, valid, test)].append(ex)
    return out


def subsample(examples: list, n: int, seed: int = 0) -> list:
    """At most n examples, a seeded sample (all of them when n is 0): fine-tuning and baselines draw the same."""
    if not n or len(examples) <= n:
        return examples
    return random.Random(seed).sample(examples, n)
