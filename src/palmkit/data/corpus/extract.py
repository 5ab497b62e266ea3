"""Extraction in parallel worker processes: each task reads a chunk of one source's files."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from palmkit.data.corpus.clean import clean_text, filter_lines, keep_as_given
from palmkit.data.corpus.readers import READERS, read_man_pages
from palmkit.data.corpus.sources import Source

MIN_DOC_CHARS = 20


CHUNK = {"man": 40, "help": 150, "fortunes": 8, "bbc": 400, "user": 50}  # files per worker task


@dataclass(frozen=True)
class Task:
    """A batch of files of one source, extracted by one worker."""

    source: str
    lang: str
    reader: str
    files: tuple[str, ...]
    filtered: bool
    text_field: str = "text"


def _raw_documents(task: Task, stats: Counter) -> Iterator[str]:
    if task.reader == "man":  # rendered as a batch
        yield from read_man_pages([Path(f) for f in task.files], stats)
        return
    for file in task.files:
        yield from READERS[task.reader](Path(file), stats)


def clean_document(doc: str, lang: str, filtered: bool, stats: Counter, as_given: bool = False) -> str | None:
    """A document cleaned (`clean_text`, or `keep_as_given` for the user's own text) and, for mixed sources,
    language-filtered; None (counted) when too short."""
    doc = keep_as_given(doc, stats) if as_given else clean_text(doc)
    if filtered:
        doc = filter_lines(doc, lang, stats)
    if len(doc.strip()) >= MIN_DOC_CHARS:
        return doc
    stats["short_docs"] += 1
    return None


def clean_documents(docs: Iterable[str], lang: str, filtered: bool, stats: Counter) -> Iterator[str]:
    """`clean_document` of each document of a built-in source, the short ones left out."""
    for doc in docs:
        doc = clean_document(doc, lang, filtered, stats)
        if doc is not None:
            yield doc


def extract(task: Task) -> tuple[list[str], Counter]:
    """Documents of a task's files, cleaned and (for mixed sources) language-filtered."""
    stats: Counter = Counter()
    return list(clean_documents(_raw_documents(task, stats), task.lang, task.filtered, stats)), stats


def source_files(source: Source, root: Path) -> list[str]:
    """A source's files in its package folder: regular files whose real path lies inside the folder (a link in an
    extracted package, to a file or to a folder on the way, may point anywhere on this machine)."""
    base = root.resolve()
    return sorted(str(p) for p in root.glob(source.pattern)
                  if p.is_file() and not p.is_symlink() and p.resolve().is_relative_to(base))


def chunk_tasks(source: str, lang: str, reader: str, files: list[str], filtered: bool, text_field: str = "text",
            ) -> list[Task]:
    n = CHUNK.get(reader, 1)
    return [Task(source, lang, reader, tuple(files[i:i + n]), filtered, text_field) for i in range(0, len(files), n)]
