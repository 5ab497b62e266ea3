"""palmkit.io: atomic writes, the staged folder swap and lenient UTF-8 decoding."""

import os

import pytest

from palmkit.errors import PalmkitError
from palmkit.io import atomic_write_bytes, decode_text, staged_dir


def test_staged_dir_replaces_the_target_on_success(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with staged_dir(target) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".ckpt.") and not any(staging.iterdir())
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging or .old folder left


def test_staged_dir_keeps_the_old_target_when_the_block_fails(tmp_path):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), staged_dir(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in target.iterdir()] == ["old.txt"] and (target / "old.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_staged_dir_makes_a_new_target_and_its_parents(tmp_path):
    target = tmp_path / "a" / "b"
    with staged_dir(target) as staging:
        (staging / "x").write_text("x")
    assert (target / "x").read_text() == "x"


def test_decode_text_drops_a_bom_and_falls_back_per_line():
    assert decode_text("\ufeffnaïve 中文\n".encode()) == "naïve 中文\n"
    mixed = "café\n".encode() + "résumé\n".encode("cp1252") + b"\x81\n"
    # Only the line that is not UTF-8 goes through the fallback; a byte cp1252 lacks becomes U+FFFD.
    assert decode_text(mixed, "cp1252") == "café\nrésumé\n\ufffd\n"
    assert decode_text("é\n".encode("latin-1"), "latin-1") == "é\n"


def test_decode_text_without_fallback_names_file_line_and_byte():
    raw = b"ok\nalso ok\nbad \xff\n"
    with pytest.raises(PalmkitError, match=r"faq\.csv: line 3 is not valid UTF-8 \(byte 15\)"):
        decode_text(raw, name="faq.csv")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    atomic_write_bytes(tmp_path / "f.bin", b"abc")
    atomic_write_bytes(tmp_path / "f.bin", b"defg")
    assert (tmp_path / "f.bin").read_bytes() == b"defg"
    assert os.listdir(tmp_path) == ["f.bin"]
