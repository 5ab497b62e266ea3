"""The user's own input files, read as a stream of records: .txt, .jsonl, .jsonl.gz, .csv, .parquet and the Arrow
files of a Hugging Face dataset saved to disk (`Dataset.save_to_disk`), single files or folders of them.

A large file is cut into pieces (byte ranges that start at a line, or groups of Parquet row groups) so that
several workers read it at once and no worker holds more than a piece. Every record that cannot be used (not
UTF-8, not JSON, no text field, past a bound of `bounds`) is reported with its file and line, never guessed at
or dropped silently.
"""

from __future__ import annotations

import csv
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from palmkit.data.corpus.bounds import (
    CHUNK,
    MAX_RECORD_BYTES,
    MAX_ROW_GROUP_BYTES,
    MAX_ROW_GROUP_ROWS,
    bounded_lines,
    max_decompressed,
    too_long,
)
from palmkit.errors import PalmkitError
from palmkit.io import warn

PIECE_BYTES = 64_000_000  # input read by one task: large enough to amortise its start, small enough to spread


KINDS = (".jsonl.gz", ".jsonl", ".txt", ".csv", ".parquet", ".arrow")


# Who gets told about a skipped record: (file, line or row, reason).
Reject = Callable[[str, int, str], None]


@dataclass(frozen=True)
class Piece:
    """Part of one input file: bytes [start, end) whose first line is number `line` (text formats), or row
    groups [start, end) whose first row is number `line` (Parquet); end -1: to the end of the file."""

    path: str
    start: int = 0
    end: int = -1
    line: int = 1


def input_kind(path: Path) -> str | None:
    """The format of an input file by its name (".jsonl.gz", ".parquet", ...), None for other files."""
    name = path.name.lower()
    return next((k for k in KINDS if name.endswith(k)), None)


def input_files(path: Path) -> list[Path]:
    """The input files of a file or folder argument (a folder is searched recursively, in name order).

    Links are followed: a link to a file wherever it points (a Hugging Face snapshot folder links each file to
    a blob beside it), a link to a folder only inside the folder given (no loop, no walk out of it); a link
    that is not followed is named in a warning."""
    if path.is_dir():
        return sorted(_walk(path, path.resolve(), set()))
    if not path.exists():
        raise PalmkitError(f"input not found: {path}")
    if input_kind(path) is None:
        raise PalmkitError(f"unsupported input file {path}: use {', '.join(KINDS)} (or a folder of them)")
    return [path]


def _walk(folder: Path, root: Path, seen: set[Path]) -> Iterator[Path]:
    """Input files under `folder`, each real file once (`seen`: the folders and files read so far, resolved);
    real entries before links, so that a file is known by its own path rather than a link's."""
    seen.add(folder.resolve())
    for p in sorted(folder.iterdir(), key=lambda p: (p.is_symlink(), p.name)):
        target = p.resolve()
        if p.is_symlink():
            if not target.exists():
                warn(f"{p}: a broken link, not read")
                continue
            if target.is_dir() and not target.is_relative_to(root):
                warn(f"{p}: a link to a folder outside {root}, not followed")
                continue
        if target in seen:
            continue
        if p.is_dir():
            yield from _walk(p, root, seen)
        elif p.is_file() and input_kind(p):
            seen.add(target)
            yield p


def pieces(path: Path, piece_bytes: int = PIECE_BYTES) -> list[Piece]:
    """A file cut into pieces of about `piece_bytes`: .jsonl at line starts (counting lines on the way, so that
    errors name the line), .parquet by row groups; the other formats are read whole by one task."""
    kind = input_kind(path)
    if kind == ".parquet":
        meta = pq.ParquetFile(path).metadata
        out, first, row, size = [], 0, 0, 0
        for g in range(meta.num_row_groups):
            size += meta.row_group(g).total_byte_size
            if size >= piece_bytes or g == meta.num_row_groups - 1:
                out.append(Piece(str(path), first, g + 1, row + 1))
                row += sum(meta.row_group(i).num_rows for i in range(first, g + 1))
                first, size = g + 1, 0
        return out or [Piece(str(path))]
    if kind != ".jsonl" or path.stat().st_size <= piece_bytes:
        return [Piece(str(path))]
    out, start, line = [], 0, 1
    with open(path, "rb") as f:
        while True:
            block = f.read(piece_bytes)
            if not block:
                break
            tail, newline = 0, 0  # finish the line the block cut, a chunk at a time (it may be gigabytes long)
            while not block.endswith(b"\n") and (part := f.readline(CHUNK)):
                tail += len(part)
                if part.endswith(b"\n"):
                    newline = 1
                    break
            end = start + len(block) + tail
            out.append(Piece(str(path), start, end, line))
            line += block.count(b"\n") + newline
            start = end
    return out


def piece_bytes(piece: Piece) -> int:
    """Input bytes of a piece (for progress in MB/s)."""
    path = Path(piece.path)
    if input_kind(path) == ".parquet":
        meta = pq.ParquetFile(path).metadata
        end = meta.num_row_groups if piece.end < 0 else piece.end
        return sum(meta.row_group(g).total_byte_size for g in range(piece.start, end))
    return (path.stat().st_size if piece.end < 0 else piece.end) - piece.start


def read_piece(piece: Piece, text_field: str, reject: Reject) -> Iterator[str]:
    """The text records of a piece; records that cannot be read go to `reject` with their line (or row)."""
    for _, text in read_records(piece, text_field, reject):
        yield text


def read_records(piece: Piece, text_field: str, reject: Reject) -> Iterator[tuple[int, str]]:
    """(line or row, text) of the text records of a piece, as `read_piece`."""
    kind = input_kind(Path(piece.path))
    reader = {".jsonl": _jsonl, ".jsonl.gz": _jsonl, ".txt": _txt, ".csv": _csv, ".parquet": _parquet,
              ".arrow": _arrow}[kind]
    for line, text, reason in reader(piece, text_field):
        if text is None:
            reject(piece.path, line, reason)
        elif text.strip():
            yield line, text


Records = Iterator[tuple[int, str | None, str]]  # (line, text or None, why not)


def _lines(piece: Piece) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, raw line, its size) of a text piece, .gz decompressed on the way; the raw line is None for
    a line past `MAX_RECORD_BYTES` (skipped unread). A .gz that decompresses past `max_decompressed` of its
    size raises OSError there."""
    gz = piece.path.lower().endswith(".gz")
    if gz:
        f = gzip.open(piece.path, "rb")
        budget = max_decompressed(Path(piece.path).stat().st_size)
    else:
        f = open(piece.path, "rb")
        f.seek(piece.start)
    with f:
        pos, number = piece.start, piece.line
        for raw, size in bounded_lines(f, MAX_RECORD_BYTES):
            if 0 <= piece.end <= pos:
                break
            if gz and pos + size > budget:
                raise OSError(f"decompresses to more than {budget} bytes (100 times its size, at least 1 GiB)")
            yield number, raw, size
            pos += size
            number += 1


def _jsonl(piece: Piece, field: str) -> Records:
    number = piece.line
    try:
        for number, raw, size in _lines(piece):
            if raw is None:
                yield number, None, too_long(size, MAX_RECORD_BYTES)
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield number, None, "not valid UTF-8"
                continue
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                yield number, None, "not JSON"
                continue
            value = obj.get(field) if isinstance(obj, dict) else None
            yield (number, value, "") if isinstance(value, str) else (number, None, f"no {field!r} string")
    except (EOFError, OSError, zlib.error) as exc:  # a truncated or corrupt .gz: what was read stays
        yield number + 1, None, f"unreadable from here on ({exc})"


def _txt(piece: Piece, field: str) -> Records:
    """Documents separated by blank lines; a document with any byte that is not UTF-8 is skipped whole."""
    para: list[str] = []
    first, bad, size = piece.line, "", 0
    for number, raw, length in _lines(piece):
        line = "\ufffd" if raw is None else raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip(" \t\r"):
            if para:
                yield first, None if bad else "\n".join(para), bad
            para, bad, size = [], "", 0
            continue
        if not para:
            first = number
        size += length
        if not bad and (raw is None or size > MAX_RECORD_BYTES):
            para, bad = [], too_long(size, MAX_RECORD_BYTES)  # the rest of the paragraph is counted, not kept
        elif not bad and _not_utf8(line):
            bad = "not valid UTF-8"
        if not bad or not para:
            para.append(line)
    if para:
        yield first, None if bad else "\n".join(para), bad


def _not_utf8(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


def _csv(piece: Piece, field: str) -> Records:
    # the csv module's own bound (128 KiB per cell, process-wide) raised out of the build; a cell may be a record
    csv.field_size_limit(max(csv.field_size_limit(), MAX_RECORD_BYTES))
    with open(piece.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        rows = csv.DictReader(f)
        if rows.fieldnames is not None and field not in rows.fieldnames:
            raise PalmkitError(f"{piece.path}: no column {field!r} (columns: {', '.join(rows.fieldnames)}); "
                               f"choose one with --text_field")
        while True:
            line = rows.line_num + 1
            try:
                row = next(rows)
            except StopIteration:
                break
            except csv.Error as exc:  # a cell past the bound, a NUL byte: the row is skipped, the next one read
                yield line, None, f"not a CSV row ({exc})"
                continue
            if _not_utf8("".join(str(v) for v in row.values())):
                yield rows.line_num, None, "not valid UTF-8"
            else:
                value = row.get(field)
                if value is None:
                    yield rows.line_num, None, "no text"
                elif len(value) > MAX_RECORD_BYTES // 4 and len(value.encode()) > MAX_RECORD_BYTES:
                    yield rows.line_num, None, too_long(len(value.encode()), MAX_RECORD_BYTES)
                else:
                    yield rows.line_num, value, ""


def _column(batch: pa.RecordBatch, field: str, path: str) -> list:
    if field not in batch.schema.names:
        raise PalmkitError(f"{path}: no column {field!r} (columns: {', '.join(batch.schema.names)}); "
                           f"choose one with --text_field")
    return batch.column(field).to_pylist()


def _values(rows: Iterator[list], first: int) -> Records:
    number = first
    for values in rows:
        for value in values:
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    value = None
            if isinstance(value, str) and len(value) > MAX_RECORD_BYTES // 4 and \
                    len(value.encode("utf-8", "surrogatepass")) > MAX_RECORD_BYTES:
                yield number, None, too_long(len(value.encode("utf-8", "surrogatepass")), MAX_RECORD_BYTES)
            else:
                yield number, value if isinstance(value, str) else None, "no text (null, or not a UTF-8 string)"
            number += 1


def _parquet(piece: Piece, field: str) -> Records:
    f = pq.ParquetFile(piece.path)
    if field not in f.schema_arrow.names:
        raise PalmkitError(f"{piece.path}: no column {field!r} (columns: {', '.join(f.schema_arrow.names)}); "
                           f"choose one with --text_field")
    end = f.metadata.num_row_groups if piece.end < 0 else piece.end
    column = f.schema_arrow.names.index(field)  # the text column's chunk in each row group (flat schemas)
    row = piece.line
    for g in range(piece.start, end):
        meta = f.metadata.row_group(g)
        decoded = meta.column(column).total_uncompressed_size if column < meta.num_columns else 0
        # a row group is decoded whole: its size is checked first (run-length encoding can hide gigabytes)
        if decoded > MAX_ROW_GROUP_BYTES or meta.num_rows > MAX_ROW_GROUP_ROWS:
            yield row, None, (f"a row group of {meta.num_rows} rows ({decoded} bytes encoded), past the bound of "
                              f"{MAX_ROW_GROUP_ROWS} rows or {MAX_ROW_GROUP_BYTES} bytes: its rows are skipped")
        else:
            batches = f.iter_batches(batch_size=4096, row_groups=[g], columns=[field])
            yield from _values((_column(b, field, piece.path) for b in batches), row)
        row += meta.num_rows


def _arrow(piece: Piece, field: str) -> Records:
    """An Arrow IPC file; `datasets` writes the stream format, pyarrow's `write_feather`/`ipc.new_file` the file
    format: both are read batch by batch, never mapped whole."""
    with pa.OSFile(piece.path, "rb") as source:
        magic = source.read(6)
        source.seek(0)
        reader = pa.ipc.open_file(source) if magic == b"ARROW1" else pa.ipc.open_stream(source)
        if magic == b"ARROW1":
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        yield from _values((_column(b, field, piece.path) for b in batches), piece.line)


def sample_text(path: Path, text_field: str, max_chars: int = 50_000) -> str:
    """The first records of a file, up to `max_chars` (what language detection looks at)."""
    out, size = [], 0
    for text in read_piece(Piece(str(path)), text_field, lambda *_: None):
        out.append(text)
        size += len(text)
        if size >= max_chars:
            break
    return "\n".join(out)[:max_chars]

