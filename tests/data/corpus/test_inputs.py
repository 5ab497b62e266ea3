"""The user's input files: every format, pieces of large files, skipped records with their lines, languages."""

from __future__ import annotations

import gzip
import itertools
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from palmkit.data.corpus.inputs import Piece, input_files, pieces, read_piece
from palmkit.errors import PalmkitError

TEXTS = [f"Dokument Nummer {i} mit etwas Text, der lang genug ist." for i in range(300)]


def read_all(ps, field="text"):
    rejected = []
    texts = [t for p in ps for t in read_piece(p, field, lambda f, n, why: rejected.append((f, n, why)))]
    return texts, rejected


def test_every_format_reads_the_same_records(tmp_path):
    rows = [{"text": t, "id": i} for i, t in enumerate(TEXTS)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table = pa.table({"text": TEXTS, "id": list(range(300))})
    pq.write_table(table, tmp_path / "c.parquet", row_group_size=50)
    # what `datasets.Dataset.save_to_disk` writes: the Arrow stream format in data-XXXXX-of-XXXXX.arrow
    hf = tmp_path / "hf"
    hf.mkdir()
    with pa.ipc.new_stream(hf / "data-00000-of-00001.arrow", table.schema) as w:
        for batch in table.to_batches(max_chunksize=64):
            w.write_batch(batch)
    (hf / "state.json").write_text("{}")
    with pa.ipc.new_file(tmp_path / "d.arrow", table.schema) as w:
        w.write_table(table)
    (tmp_path / "e.txt").write_text("\n\n".join(TEXTS) + "\n")
    (tmp_path / "f.csv").write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
    files = input_files(tmp_path)
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl.gz", "c.parquet", "d.arrow", "e.txt", "f.csv",
                                       "data-00000-of-00001.arrow"]
    for file in files:
        texts, rejected = read_all(pieces(file))
        assert texts == TEXTS and not rejected, file.name


def test_large_files_split_into_pieces_with_their_lines(tmp_path):
    path = tmp_path / "big.jsonl"
    lines = [json.dumps({"text": t}) for t in TEXTS]
    lines[123] = "{broken"
    lines[250] = json.dumps({"other": "x"})
    path.write_bytes(("\n".join(lines) + "\n").encode())
    parts = pieces(path, piece_bytes=2000)
    assert len(parts) > 5 and parts[0].start == 0 and parts[-1].end == path.stat().st_size
    assert all(a.end == b.start for a, b in itertools.pairwise(parts))
    texts, rejected = read_all(parts)
    assert texts == [t for i, t in enumerate(TEXTS) if i not in (123, 250)]
    assert rejected == [(str(path), 124, "not JSON"), (str(path), 251, "no 'text' string")]
    table = pa.table({"text": TEXTS})
    pq.write_table(table, tmp_path / "p.parquet", row_group_size=20)
    groups = pieces(tmp_path / "p.parquet", piece_bytes=1)  # one row group each
    assert len(groups) == 15 and groups[3] == Piece(str(tmp_path / "p.parquet"), 3, 4, 61)
    assert read_all(groups)[0] == TEXTS


def test_invalid_records_are_reported_with_file_and_line(tmp_path):
    (tmp_path / "x.jsonl").write_bytes(b'{"text": "gut genug und lang"}\n\n{"text": "kaputt \xff"}\n[1, 2]\n'
                                       b'{"text": 5}\n')
    (tmp_path / "y.txt").write_bytes(b"Erster Absatz.\n\nZweiter \xc3\x28 Absatz\nnoch eine Zeile\n\n\nDritter.\n")
    table = pa.table({"text": ["eins", None, "drei"]})
    pq.write_table(table, tmp_path / "z.parquet")
    texts, rejected = read_all([p for f in input_files(tmp_path) for p in pieces(f)])
    assert texts == ["gut genug und lang", "Erster Absatz.", "Dritter.", "eins", "drei"]
    assert [(f.rsplit("/", 1)[1], n) for f, n, _ in rejected] == [("x.jsonl", 3), ("x.jsonl", 4), ("x.jsonl", 5),
                                                                   ("y.txt", 3), ("z.parquet", 2)]
    gz = tmp_path / "cut.jsonl.gz"
    gz.write_bytes(gzip.compress(b"".join(json.dumps({"text": t}).encode() + b"\n" for t in TEXTS))[:600])
    texts, rejected = read_all(pieces(gz))
    assert texts == TEXTS[:len(texts)] and len(rejected) == 1 and "unreadable" in rejected[0][2]


def test_missing_columns_and_unknown_files_are_clear_errors(tmp_path):
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(PalmkitError, match=r"no column 'text'.*body"):
        read_all(pieces(tmp_path / "a.parquet"))
    (tmp_path / "b.docx").write_text("x")
    with pytest.raises(PalmkitError, match="unsupported input file"):
        input_files(tmp_path / "b.docx")
    with pytest.raises(PalmkitError, match="input not found"):
        input_files(tmp_path / "nope.jsonl")


def test_records_past_the_bound_are_skipped_unheld_and_reported_with_their_line(tmp_path, monkeypatch):
    from palmkit.data.corpus import inputs

    monkeypatch.setattr(inputs, "MAX_RECORD_BYTES", 1000)
    huge = "x" * 5000
    rows = [{"text": TEXTS[0]}, {"text": huge}, {"text": TEXTS[1]}]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    (tmp_path / "c.txt").write_text(f"{TEXTS[0]}\n\n{huge[:600]}\n{huge[:600]}\n\n{TEXTS[1]}\n")
    (tmp_path / "d.csv").write_text(f'id,text\n0,"{TEXTS[0]}"\n1,"{huge}"\n2,"{TEXTS[1]}"\n')
    pq.write_table(pa.table({"text": [TEXTS[0], huge, TEXTS[1]]}), tmp_path / "e.parquet")
    for name, line in (("a.jsonl", 2), ("b.jsonl.gz", 2), ("c.txt", 3), ("d.csv", 3), ("e.parquet", 2)):
        texts, rejected = read_all(pieces(tmp_path / name))
        assert texts == TEXTS[:2], name
        assert [n for _, n, _ in rejected] == [line], name
        assert "past the bound of 1000 bytes per record" in rejected[0][2] or "not a CSV row" in rejected[0][2], name


def test_a_csv_cell_past_the_csv_modules_limit_is_a_record_not_a_crash(tmp_path):
    big = "word " * 40_000  # 200 KB: past the csv module's 128 KiB default, well inside a record's bound
    (tmp_path / "a.csv").write_text(f'id,text\n0,"{TEXTS[0]}"\n1,"{big}"\n2,"{TEXTS[1]}"\n')
    texts, rejected = read_all(pieces(tmp_path / "a.csv"))
    assert texts == [TEXTS[0], big, TEXTS[1]] and not rejected


def test_a_gzip_bomb_stops_at_its_bound_and_is_reported(tmp_path, monkeypatch):
    from palmkit.data.corpus import inputs

    path = tmp_path / "bomb.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"text": TEXTS[i % 300]}) + "\n" for i in range(2000))
    monkeypatch.setattr(inputs, "max_decompressed", lambda size: 20 * size)
    texts, rejected = read_all(pieces(path))
    assert 0 < len(texts) < 2000
    assert len(rejected) == 1 and rejected[0][1] == len(texts) + 1 and "decompresses to more than" in rejected[0][2]


def test_a_parquet_row_group_past_the_bound_is_skipped_with_its_first_row(tmp_path, monkeypatch):
    from palmkit.data.corpus import inputs

    pq.write_table(pa.table({"text": TEXTS}), tmp_path / "a.parquet", row_group_size=100)
    monkeypatch.setattr(inputs, "MAX_ROW_GROUP_ROWS", 99)
    texts, rejected = read_all(pieces(tmp_path / "a.parquet"))
    assert texts == [] and [(n, "row group" in why) for _, n, why in rejected] == [(1, True), (101, True),
                                                                                   (201, True)]
    monkeypatch.setattr(inputs, "MAX_ROW_GROUP_ROWS", 100)
    assert read_all(pieces(tmp_path / "a.parquet")) == (TEXTS, [])


def test_links_are_followed_to_files_and_to_folders_inside_the_input(tmp_path):
    """A Hugging Face snapshot folder: each file a link to a blob outside it; a folder link inside is read once,
    one outside is not followed."""
    repo = tmp_path / "datasets--x"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "abc").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS[:3]))
    snap = repo / "snapshots" / "rev"
    (snap / "data").mkdir(parents=True)
    (snap / "data" / "train.jsonl").symlink_to(repo / "blobs" / "abc")
    (snap / "again").symlink_to(snap / "data")  # inside: the same files, read once
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps({"text": "not mine"}) + "\n")
    (snap / "out").symlink_to(outside)
    files = input_files(snap)
    assert [f.relative_to(snap).as_posix() for f in files] == ["data/train.jsonl"]
    assert read_all(pieces(files[0]))[0] == TEXTS[:3]
