"""Monitor inputs: polled folders and appended lines, stdin with duplicates, a replaced file never read twice."""

import io

import pytest

from palmkit.apps.monitor.monitor import Monitor
from palmkit.errors import PalmkitError
from tests.apps.monitor.conftest import RULE, Stub, one_pass, record, shift_stream, write


def test_folder_polling_picks_up_new_files_and_appended_lines(tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    lines = shift_stream()
    write(inbox / "a.jsonl", lines[:10])
    (inbox / ".b.jsonl.tmp").write_text(lines[0])  # a half-written temporary: not an input
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True) as mon:
        assert mon.poll([str(inbox)], final=False) == 10
        with open(inbox / "a.jsonl", "a") as f:
            f.write("".join(lines[10:15]) + lines[15].rstrip("\n"))  # the last line is still being written
        write(inbox / "b.jsonl", lines[16:30])
        assert mon.poll([str(inbox)], final=False) == 5 + 14
        with open(inbox / "a.jsonl", "a") as f:
            f.write("\n")
        assert mon.poll([str(inbox)], final=False) == 1
        assert mon.poll([str(inbox)], final=False) == 0
        assert sum(t.n for t in mon.state["topics"].values()) == 30


def test_stdin_input_and_duplicates(tmp_path):
    data = "".join(shift_stream()[:20]).encode() + record(99, "oil", True, id="x1").encode()
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True) as mon:
        assert mon.poll(["-"], stdin=io.BytesIO(data)) == 21
    # Stdin has no offsets: a replay is recognised by ids, or by content where there is none
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True) as mon:
        more = record(100, "oil", False, id="x1") + record(101, "oil", False)
        assert mon.poll(["-"], stdin=io.BytesIO(data + more.encode())) == 1
        assert mon.new["duplicates"] == 22


def test_a_replaced_input_is_not_read_twice(tmp_path):
    stream = write(tmp_path / "s.jsonl", shift_stream())
    one_pass(tmp_path, stream, "st")
    write(stream, shift_stream()[::-1])
    with pytest.raises(PalmkitError, match=r"changed before byte \d+ .* would count texts twice"):
        one_pass(tmp_path, stream, "st")


def test_follow_reads_a_rotated_file_from_its_start(tmp_path, capsys):
    feed = tmp_path / "feed.jsonl"
    lines = shift_stream()
    write(feed, lines[:10])
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True) as mon:
        assert mon.poll([str(feed)], final=False) == 10
        with open(feed, "a") as f:
            f.write("".join(lines[10:14]))  # written just before the rotation
        feed.rename(tmp_path / "feed.jsonl.1")  # rotated by renaming: a new file takes the name
        write(feed, lines[14:20])
        assert mon.poll([str(feed)], final=False) == 4 + 6  # the old file's last lines, then the new file
        write(feed, lines[20:23])  # rotated by copying and truncating: the same file, shorter
        assert mon.poll([str(feed)], final=False) == 3
        assert mon.poll([str(feed)], final=False) == 0
        assert sum(t.n for t in mon.state["topics"].values()) == 23
    assert capsys.readouterr().err.count(f"{feed} was rotated") == 2
    # Without --follow a file that changed before the offset already read is still an error
    write(feed, lines[30:32])
    with pytest.raises(PalmkitError, match="changed before byte"):
        one_pass(tmp_path, feed, "st")
