"""Bounds on what one input record or file may cost to read, whatever the file says about itself.

A corpus build streams its inputs, but a reader still holds one record at a time, and a record is whatever
the file makes it: one line of a .jsonl (a 24 MB line is a 24 MB string, and the build's cleaning, language
identification and deduplication multiply that), one decompressed line of a .jsonl.gz (a 400 KB gzip member can
hold a gigabyte of one line), one Parquet row group (decoded whole: a few hundred bytes of run-length encoding
can stand for gigabytes), one CSV cell. Each is checked before it is held: a line is read in bounded chunks and
one past `MAX_RECORD_BYTES` is skipped to its end without being kept; a row group is checked against its
metadata's size and row count; a .gz stops decompressing past `max_decompressed(compressed size)`. What is skipped
is reported with its file and line (or row), as every unreadable record is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

MAX_RECORD_BYTES = 8 << 20
"""One record (document): 8 MiB, a long book. Larger ones are skipped and reported."""

MAX_ROW_GROUP_BYTES = 512 << 20
"""One Parquet row group's text column, as its metadata gives its size: it is read whole, so bounded."""

MAX_ROW_GROUP_ROWS = 1 << 24
"""Rows in one Parquet row group: run-length and dictionary encodings can make a few bytes billions of rows,
each decoded to at least an offset; 16 M rows is past what writers make (about 1 M rows of short texts)."""

DECOMPRESSED_RATIO, DECOMPRESSED_FLOOR = 100, 1 << 30
"""A .gz may decompress to 100 times its size or 1 GiB, whichever is more; text compresses 3-10 times."""

CHUNK = 1 << 16


def max_decompressed(compressed: int) -> int:
    """The most bytes a compressed file of `compressed` bytes may decompress to."""
    return max(DECOMPRESSED_FLOOR, DECOMPRESSED_RATIO * compressed)


def bounded_lines(f: BinaryIO, limit: int = MAX_RECORD_BYTES) -> Iterator[tuple[bytes | None, int]]:
    """(line, bytes it took) of a binary file, each line with its newline; None for a line longer than `limit`,
    which is read to its end in chunks of CHUNK bytes and never held."""
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        if len(line) <= limit or line.endswith(b"\n"):
            yield line, len(line)
            continue
        size = len(line)
        while True:  # past the bound: skip to the end of the line
            part = f.readline(CHUNK)
            size += len(part)
            if not part or part.endswith(b"\n"):
                break
        yield None, size


def too_long(size: int, limit: int = MAX_RECORD_BYTES) -> str:
    """The reason a record of `size` bytes is skipped."""
    return f"a record of {size} bytes, past the bound of {limit} bytes per record"
