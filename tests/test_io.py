"""palmkit.io: atomic writes, the staged folder swap (never over a folder palmkit did not make), lenient UTF-8."""

import json
import os
import subprocess
import sys

import pytest

from palmkit.errors import PalmkitError
from palmkit.io import (
    MANIFEST,
    PREVIOUS,
    STAGING_MARK,
    atomic_copy,
    atomic_open,
    atomic_write_bytes,
    atomic_write_json,
    check_destination,
    decode_text,
    remove_stale_staging,
    staged_dir,
    written_names,
)


def test_staged_dir_replaces_the_target_on_success(tmp_path):
    target = tmp_path / "ckpt"
    with staged_dir(target, own={"old.txt", "new.txt"}) as staging:
        (staging / "old.txt").write_text("old")
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "old.txt"] and written_names(target) == {"old.txt"}
    with staged_dir(target, own={"old.txt", "new.txt"}) as staging:
        assert staging.parent == tmp_path and staging.name.startswith(".ckpt.")
        assert [p.name for p in staging.iterdir()] == [STAGING_MARK]  # proof that palmkit made it
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "new.txt"]
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


def test_a_folder_with_other_files_is_refused_not_replaced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "config.json").write_text("{}")
    ran = []
    with pytest.raises(PalmkitError, match=r"out is not a palmkit folder \(it holds files palmkit did not write "
                                           r"there: config\.json, notes\.txt\): .* --force"):
        with staged_dir(target, own={"config.json", "model.bin"}):
            ran.append(True)
    assert not ran  # refused before any work
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "notes.txt"]
    # Without `own` the staged files decide what is palmkit's: the swap is refused after the block
    with pytest.raises(PalmkitError, match=r"notes\.txt"), staged_dir(target) as staging:
        (staging / "config.json").write_text('{"new": 1}')
    assert (target / "notes.txt").read_text() == "mine" and (target / "config.json").read_text() == "{}"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(PalmkitError, match="exists and is not a folder"):
        check_destination(tmp_path / "file", {"x"}, force=True)


def test_force_replaces_palmkits_files_and_keeps_the_others(tmp_path):
    target = tmp_path / "out"
    own = {"model.bin", "config.json", "logs", "stale.json"}
    with staged_dir(target, own) as staging:  # palmkit wrote these: its manifest lists them
        (staging / "logs").mkdir()
        (staging / "logs" / "old.log").write_text("old log")
        (staging / "model.bin").write_text("old weights")
        (staging / "stale.json").write_text("from an earlier version")
    (target / "notes.txt").write_text("mine")
    with staged_dir(target, own, force=True) as staging:
        (staging / "model.bin").write_text("new weights")
        (staging / "config.json").write_text("{}")
        (staging / "logs").mkdir()
        (staging / "logs" / "new.log").write_text("new log")
    assert sorted(p.name for p in target.iterdir()) == [MANIFEST, "config.json", "logs", "model.bin", "notes.txt"]
    assert (target / "model.bin").read_text() == "new weights" and (target / "notes.txt").read_text() == "mine"
    assert [p.name for p in (target / "logs").iterdir()] == ["new.log"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert written_names(target) == {"config.json", "logs", "model.bin"}


def test_names_palmkit_writes_are_not_palmkits_unless_it_wrote_them(tmp_path):
    """A user's eval/gold.jsonl and tensorboard/ carry names a fine-tuned folder has: neither replaced without
    --force nor removed or written over with it."""
    target = tmp_path / "out"
    (target / "eval").mkdir(parents=True)
    (target / "eval" / "gold.jsonl").write_text("mine")
    (target / "tensorboard").mkdir()
    (target / "tensorboard" / "events").write_text("my runs")
    own = {"model.bin", "eval", "tensorboard"}
    with pytest.raises(PalmkitError, match=r"not a palmkit folder .*eval, tensorboard"):
        with staged_dir(target, own) as staging:
            (staging / "model.bin").write_text("weights")
    with pytest.raises(PalmkitError, match=r"holds eval, tensorboard, which palmkit did not write there"):
        with staged_dir(target, own, force=True) as staging:  # it would write over them: refused before work
            (staging / "model.bin").write_text("weights")
    with staged_dir(target, {"model.bin"}, force=True) as staging:  # palmkit's file beside the user's
        (staging / "model.bin").write_text("weights")
    assert (target / "eval" / "gold.jsonl").read_text() == "mine"
    assert (target / "tensorboard" / "events").read_text() == "my runs"
    assert written_names(target) == {"model.bin"}
    with pytest.raises(PalmkitError, match=r"holds eval, .*did not write"):  # caught at the swap too
        with staged_dir(target, {"model.bin"}, force=True) as staging:
            (staging / "eval").mkdir()
    assert (target / "eval" / "gold.jsonl").read_text() == "mine"
    # a folder holding nothing but palmkit's names, none of them written by palmkit, is not replaced
    other = tmp_path / "other"
    (other / "eval").mkdir(parents=True)
    (other / "eval" / "gold.jsonl").write_text("mine")
    with pytest.raises(PalmkitError, match="not a palmkit folder"):
        check_destination(other, own)


def test_written_files_and_folders_get_the_umask_and_keep_their_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "new.bin", b"x")
        assert (tmp_path / "new.bin").stat().st_mode & 0o777 == 0o644  # as open() makes it, not 0600
        (tmp_path / "shared.json").write_text("{}")
        os.chmod(tmp_path / "shared.json", 0o664)
        atomic_write_json(tmp_path / "shared.json", {"a": 1})
        assert (tmp_path / "shared.json").stat().st_mode & 0o777 == 0o664  # a rewrite keeps the mode
        with staged_dir(tmp_path / "ckpt", {"w"}) as staging:
            (staging / "w").write_text("w")
        assert (tmp_path / "ckpt").stat().st_mode & 0o777 == 0o755  # as mkdir makes it, not 0700
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "private.bin", b"x")
        assert (tmp_path / "private.bin").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_a_link_is_written_through_only_with_force(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "notes.txt").write_text("mine")
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(PalmkitError, match="link"):
        check_destination(link, {"a"})
    with staged_dir(link, {"a"}, force=True) as staging:
        (staging / "a").write_text("a")
    assert link.is_symlink() and sorted(p.name for p in real.iterdir()) == [MANIFEST, "a", "notes.txt"]


def test_a_killed_run_leaves_staging_that_the_next_run_removes(tmp_path):
    """kill -9 inside the block: the staging folder stays; the next staged_dir removes it, and only it."""
    target = tmp_path / "ckpt"
    script = (f"import os, signal\nfrom palmkit.io import staged_dir\nwith staged_dir({str(target)!r}) as s:\n"
              "    (s / 'half').write_text('x')\n    os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", script], check=False)
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt.")]
    assert len(left) == 1 and (left[0] / "half").is_file()
    (tmp_path / ".ckpt.mine.tmp").mkdir()  # not made by palmkit (no mark): never touched
    live = tmp_path / ".ckpt.live.tmp"  # made by a palmkit process that is still running: never touched
    live.mkdir()
    (live / STAGING_MARK).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename}))
    with staged_dir(target) as staging:
        (staging / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".ckpt.live.tmp", ".ckpt.mine.tmp", "ckpt"]


def test_a_swap_cut_short_is_put_back(tmp_path):
    """Killed between moving the old folder aside and moving the new one in: the old one comes back."""
    target = tmp_path / "ckpt"
    holder = tmp_path / ".ckpt.abc.tmp"
    (holder / PREVIOUS).mkdir(parents=True)
    (holder / PREVIOUS / "model.bin").write_text("old")
    (holder / STAGING_MARK).write_text(json.dumps({"pid": 2**22 + 1, "host": os.uname().nodename}))
    assert remove_stale_staging(target) == [holder]
    assert (target / "model.bin").read_text() == "old" and not holder.exists()


def test_atomic_open_and_copy_leave_the_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_open(path, "w", encoding="utf-8") as f:
        f.write("half")
        raise RuntimeError
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]
    atomic_copy(path, tmp_path / "copy.txt")
    assert (tmp_path / "copy.txt").read_text() == "old" and sorted(os.listdir(tmp_path)) == ["copy.txt", "f.txt"]


def test_jsonl_rows_number_lines_skip_blanks_and_name_a_bad_line():
    from palmkit.io import jsonl_rows

    assert list(jsonl_rows('{"a": 1}\n\n  \n[2]\n', name="f.jsonl")) == [(1, {"a": 1}), (4, [2])]
    with pytest.raises(PalmkitError, match=r"^f.jsonl: line 3 is not JSON \("):
        list(jsonl_rows('1\n\n{oops\n', name="f.jsonl"))


def test_jsonl_rows_streams_a_file_and_can_pass_over_a_torn_line(tmp_path):
    from palmkit.io import jsonl_rows

    path = tmp_path / "log.jsonl"
    path.write_bytes(b'{"step": 1}\n\n{"step": 2}\n{"ste')  # the last line torn by a crash
    with open(path, encoding="utf-8") as f:
        assert list(jsonl_rows(f, path, skip_bad=True)) == [(1, {"step": 1}), (3, {"step": 2})]
    with open(path, "rb") as f, pytest.raises(PalmkitError, match=r"log\.jsonl: line 4 is not JSON"):
        list(jsonl_rows(f, path))


def test_load_json_names_what_the_file_is(tmp_path):
    from palmkit.errors import CheckpointError
    from palmkit.io import load_json

    with pytest.raises(CheckpointError, match=r"^missing run options file: .*train_config\.json$"):
        load_json(tmp_path / "train_config.json", "run options file")
    (tmp_path / "latest.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"^corrupt latest-checkpoint pointer .*latest\.json: not JSON \("):
        load_json(tmp_path / "latest.json", "latest-checkpoint pointer")
    (tmp_path / "ok.json").write_text('{"a": [1]}')
    assert load_json(tmp_path / "ok.json", "test file") == {"a": [1]}


def test_load_tensors_maps_the_file_instead_of_reading_it_whole(tmp_path):
    import tracemalloc

    import torch

    from palmkit.io import load_tensors, save_tensors

    weights = {"w": torch.randn(2048, 2048)}  # 16 MiB
    save_tensors(tmp_path / "w.safetensors", weights)
    tracemalloc.start()
    loaded = load_tensors(tmp_path / "w.safetensors")
    _, peak = tracemalloc.get_traced_memory()  # Python objects only: a bytes copy of the file would count
    tracemalloc.stop()
    assert torch.equal(loaded["w"], weights["w"])
    assert peak < 1 << 20
