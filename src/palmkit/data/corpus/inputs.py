"""The user's own input files, read as a stream of records: .txt, .jsonl, .jsonl.gz, .csv, .parquet and the Arrow
files of a Hugging Face dataset saved to disk (`Dataset.save_to_disk`), single files or folders of them.

A large file is cut into pieces (byte ranges that start at a line, or groups of Parquet row groups) so that
several workers read it at once and no worker holds more than a piece. Every record that cannot be used (not
UTF-8, not JSON, no text field) is reported with its file and line, never guessed at or dropped silently.
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

from palmkit.errors import PalmkitError

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
    """The input files of a file or folder argument (a folder is searched recursively, in name order)."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.is_symlink() and input_kind(p))
        return files
    if not path.exists():
        raise PalmkitError(f"input not found: {path}")
    if input_kind(path) is None:
        raise PalmkitError(f"unsupported input file {path}: use {', '.join(KINDS)} (or a folder of them)")
    return [path]


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
            tail = f.readline()  # finish the line the block cut
            end = start + len(block) + len(tail)
            out.append(Piece(str(path), start, end, line))
            line += block.count(b"\n") + tail.count(b"\n")
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


def _lines(piece: Piece) -> Iterator[tuple[int, bytes]]:
    """(line number, raw line) of a text piece, .gz decompressed on the way."""
    if piece.path.lower().endswith(".gz"):
        f = gzip.open(piece.path, "rb")
    else:
        f = open(piece.path, "rb")
        f.seek(piece.start)
    with f:
        pos, number = piece.start, piece.line
        for raw in f:
            if 0 <= piece.end <= pos:
                break
            yield number, raw
            pos += len(raw)
            number += 1


def _jsonl(piece: Piece, field: str) -> Records:
    number = piece.line
    try:
        for number, raw in _lines(piece):
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
    first, bad = piece.line, False
    for number, raw in _lines(piece):
        line = raw.decode("utf-8", errors="surrogateescape").rstrip("\r\n")
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip(" \t\r"):
            if para:
                yield first, None if bad else "\n".join(para), "not valid UTF-8"
            para, bad = [], False
            continue
        if not para:
            first = number
        para.append(line)
        bad = bad or _not_utf8(line)
    if para:
        yield first, None if bad else "\n".join(para), "not valid UTF-8"


def _not_utf8(text: str) -> bool:
    return any("\udc80" <= c <= "\udcff" for c in text)


def _csv(piece: Piece, field: str) -> Records:
    with open(piece.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        rows = csv.DictReader(f)
        if rows.fieldnames is not None and field not in rows.fieldnames:
            raise PalmkitError(f"{piece.path}: no column {field!r} (columns: {', '.join(rows.fieldnames)}); "
                               f"choose one with --text_field")
        for row in rows:
            if _not_utf8("".join(str(v) for v in row.values())):
                yield rows.line_num, None, "not valid UTF-8"
            else:
                value = row.get(field)
                yield (rows.line_num, value, "") if value is not None else (rows.line_num, None, "no text")


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
            yield number, value if isinstance(value, str) else None, "no text (null, or not a UTF-8 string)"
            number += 1


def _parquet(piece: Piece, field: str) -> Records:
    f = pq.ParquetFile(piece.path)
    if field not in f.schema_arrow.names:
        raise PalmkitError(f"{piece.path}: no column {field!r} (columns: {', '.join(f.schema_arrow.names)}); "
                           f"choose one with --text_field")
    end = f.metadata.num_row_groups if piece.end < 0 else piece.end
    batches = f.iter_batches(batch_size=4096, row_groups=list(range(piece.start, end)), columns=[field])
    yield from _values((_column(b, field, piece.path) for b in batches), piece.line)


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

