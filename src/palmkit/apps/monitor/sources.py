"""Where records come from: files read from a byte offset, stdin, and polled folders of *.jsonl files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

FINGERPRINT_BYTES = 1024  # a file whose first bytes changed was replaced, not appended to


STDIN = "-"


class Line(NamedTuple):
    raw: bytes
    lineno: int
    end: int  # byte offset just after the line (-1 for stdin)


def fingerprint(source: Path | BinaryIO, offset: int) -> str:
    """A hash of a file's first bytes (up to `offset`), of a path or of an open file (read without moving it)."""
    n = min(offset, FINGERPRINT_BYTES)
    if isinstance(source, Path):
        with open(source, "rb") as f:
            head = f.read(n)
    else:
        head = os.pread(source.fileno(), n, 0)
    return hashlib.blake2b(head, digest_size=8).hexdigest()


def file_lines(f: BinaryIO, offset: int, lineno: int, final: bool) -> Iterator[Line]:
    """Lines of an open file from a byte offset; a last line without a newline is left for later unless `final`
    (a writer may be half-way through it)."""
    f.seek(offset)
    for raw in iter(f.readline, b""):
        if not raw.endswith(b"\n") and not final:
            return
        offset += len(raw)
        lineno += 1
        yield Line(raw.rstrip(b"\r\n"), lineno, offset)


def stream_lines(stream: BinaryIO) -> Iterator[list[Line]]:
    """Groups of the complete lines a stream has made available: a live pipe is scored as it arrives."""
    buf, lineno = b"", 0
    read = getattr(stream, "read1", stream.read)
    while chunk := read(1 << 16):
        *done, buf = (buf + chunk).split(b"\n")
        group = []
        for raw in done:
            lineno += 1
            group.append(Line(raw.rstrip(b"\r"), lineno, -1))
        yield group
    if buf.strip():
        yield [Line(buf.rstrip(b"\r"), lineno + 1, -1)]


def input_files(spec: str) -> list[Path]:
    """The files an --input names: the file itself, or a folder's *.jsonl (hidden files, e.g. half-written
    temporaries, left out)."""
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.glob("*.jsonl") if p.is_file() and not p.name.startswith("."))
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    return [path]


def batched(lines: Iterator[Line], size: int) -> Iterator[list[Line]]:
    batch: list[Line] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
