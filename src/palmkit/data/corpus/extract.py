"""Extraction in parallel worker processes: each task reads a chunk of one source's files."""

from __future__ import annotations

import multiprocessing
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from palmkit.data.corpus.clean import clean_text, filter_lines
from palmkit.data.corpus.readers import READERS, USER_SUFFIXES, read_man_pages
from palmkit.data.corpus.sources import Source
from palmkit.errors import PalmkitError

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
    kwargs = {"text_field": task.text_field} if task.reader == "user" else {}
    for file in task.files:
        yield from READERS[task.reader](Path(file), stats, **kwargs)


def extract(task: Task) -> tuple[list[str], Counter]:
    """Documents of a task's files, cleaned and (for mixed sources) language-filtered."""
    stats: Counter = Counter()
    docs = []
    for doc in _raw_documents(task, stats):
        doc = clean_text(doc)
        if task.filtered:
            doc = filter_lines(doc, task.lang, stats)
        if len(doc) >= MIN_DOC_CHARS:
            docs.append(doc)
        else:
            stats["short_docs"] += 1
    return docs, stats


def source_files(source: Source, root: Path) -> list[str]:
    return sorted(str(p) for p in root.glob(source.pattern) if p.is_file() and not p.is_symlink())


def user_files(path: Path) -> list[str]:
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in USER_SUFFIXES)
    if not path.exists():
        raise PalmkitError(f"input not found: {path}")
    if path.suffix.lower() not in USER_SUFFIXES:
        raise PalmkitError(f"unsupported input file {path}: use .txt, .jsonl or .csv")
    return [str(path)]


def chunk_tasks(source: str, lang: str, reader: str, files: list[str], filtered: bool, text_field: str = "text",
            ) -> list[Task]:
    n = CHUNK.get(reader, 1)
    return [Task(source, lang, reader, tuple(files[i:i + n]), filtered, text_field) for i in range(0, len(files), n)]


def parallel_map(fn: Callable, items: list, workers: int) -> Iterator:
    """`map` in worker processes, results in input order (so output is the same for any number of workers)."""
    if workers <= 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with context.Pool(min(workers, len(items))) as pool:
        yield from pool.imap(fn, items)


def run_tasks(tasks: list[Task], workers: int) -> Iterator[tuple[Task, list[str], Counter]]:
    with tqdm(total=len(tasks), desc="extract", unit="batch", mininterval=1.0, disable=None) as bar:  # TTY only
        for task, (docs, stats) in zip(tasks, parallel_map(extract, tasks, workers), strict=True):
            yield task, docs, stats
            bar.update()
