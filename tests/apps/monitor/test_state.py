"""The monitor's state folder: refused when corrupt or made with another rule, locked, recognised as stale; alerts
it did not write are never removed; its state stays bounded and a commit writes only what a batch changed."""

import io
import json
import sqlite3

import pytest

from palmkit.apps.monitor.monitor import Monitor
from palmkit.apps.monitor.rule import Rule, rule_settings
from palmkit.apps.monitor.state import ALERTS_FILE, LEGACY_STATE_FILE, STATE_FILE, classifier_id, is_stale, saved_state
from palmkit.errors import PalmkitError
from tests.apps.monitor.conftest import RULE, Stub, one_pass, record, shift_stream, write


def test_corrupt_or_mismatched_state_is_an_error_and_left_alone(tmp_path):
    stream = write(tmp_path / "s.jsonl", shift_stream())
    one_pass(tmp_path, stream, "st")
    state = tmp_path / "st" / STATE_FILE
    with pytest.raises(PalmkitError, match=r"was made with a different rule \(window=4"):
        Monitor(Stub(), tmp_path / "st", Rule())
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True):  # the lock: one monitor per state folder
        with pytest.raises(PalmkitError, match="another monitor is running"):
            Monitor(Stub(), tmp_path / "st", RULE)
    for broken in (b'{"version": 1, "rule"', b"[]", b"SQLite format 3\x00 but then nothing"):
        state.write_bytes(broken)
        with pytest.raises(PalmkitError, match=f"state file {state} is corrupt .* it was left as it is"):
            Monitor(Stub(), tmp_path / "st", RULE)
        assert state.read_bytes() == broken
    state.unlink()
    sqlite3.connect(state).execute("CREATE TABLE other (x)").connection.close()  # a database, not a monitor's
    with pytest.raises(PalmkitError, match=f"state file {state} is corrupt .*{ALERTS_FILE} is kept"):
        Monitor(Stub(), tmp_path / "st", RULE)


def test_a_state_made_with_other_settings_or_another_classifier_is_stale(tmp_path):
    stream = write(tmp_path / "s.jsonl", shift_stream())
    one_pass(tmp_path, stream, "st")
    state_dir = tmp_path / "st"
    saved = saved_state(state_dir)["classifier"]
    assert not is_stale(state_dir, RULE, 0, saved)
    assert is_stale(state_dir, Rule(), 0, saved)  # another rule
    assert is_stale(state_dir, RULE, 3, saved)  # another max_parts
    assert is_stale(state_dir, RULE, 0, saved + "x")  # another classifier
    assert not is_stale(tmp_path / "nothing-here", RULE, 0, saved)  # no state: nothing to be stale


def test_classifier_id_follows_the_heads_bytes(tmp_path):
    (tmp_path / "head.safetensors").write_bytes(b"weights one")
    first = classifier_id(tmp_path)
    assert first.startswith(f"{tmp_path}#") and classifier_id(tmp_path) == first
    (tmp_path / "head.safetensors").write_bytes(b"weights two")
    assert classifier_id(tmp_path) != first
    assert classifier_id(tmp_path / "missing") == f"{tmp_path / 'missing'}#?"


def test_alerts_the_monitor_did_not_write_are_never_removed(tmp_path, capsys):
    stream = write(tmp_path / "s.jsonl", shift_stream())
    alerts = tmp_path / "st" / ALERTS_FILE
    one_pass(tmp_path, stream, "st")
    first = alerts.read_bytes()
    assert first.count(b"\n") == 1
    note = b'{"note": "kept by the operator"}\n'
    with open(alerts, "ab") as f:  # a line someone else appended
        f.write(note)
    one_pass(tmp_path, stream, "st")
    assert alerts.read_bytes() == first + note
    assert f"{alerts}: keeping {len(note)} bytes that this monitor did not write" in capsys.readouterr().err
    # The state removed, as the corrupt-state message allows: the alerts stay, the new ones come after them
    for p in (tmp_path / "st").glob(STATE_FILE + "*"):
        p.unlink()
    one_pass(tmp_path, stream, "st")
    assert alerts.read_bytes() == first + note + first


def test_state_growth_is_bounded_and_a_commit_writes_only_the_batch(tmp_path):
    lines = [record(i, f"topic{i % 3}", i % 4 == 0, id=f"r{i}") for i in range(308)]
    stream = tmp_path / "s.jsonl"

    def writes_of_the_last_batch(mon, upto: int) -> list[str]:
        """Append records up to `upto`, poll all but the last 8, then trace the SQL that the last batch writes."""
        write(stream, lines[:upto - 8])
        mon.poll([str(stream)])
        statements: list[str] = []
        mon.store.db.set_trace_callback(statements.append)
        write(stream, lines[:upto])
        assert mon.poll([str(stream)]) == 8
        mon.store.db.set_trace_callback(None)
        return [s for s in statements if s.lstrip().upper().startswith(("INSERT", "DELETE", "UPDATE"))]

    with Monitor(Stub(), tmp_path / "st", RULE, batch_size=8, quiet=True, seen_window=50) as mon:
        early = writes_of_the_last_batch(mon, 40)
        late = writes_of_the_last_batch(mon, 308)
    # A batch writes its own ids, topics and chart points: as much after 308 records as after 40
    assert 0 < len(late) == len(early) <= 3 * 8 + 8
    saved = saved_state(tmp_path / "st")
    assert saved["seen"] == 50  # only the last 50 ids are remembered
    assert saved["counts"]["records"] == 308 and sum(t.n for t in saved["topics"].values()) == 308
    redelivered = write(tmp_path / "again.jsonl", [lines[0], lines[307]])
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True, seen_window=50) as mon:
        assert mon.poll([str(redelivered)]) == 1  # r307 is recent: skipped; r0 is older than the window: new
        assert mon.new["duplicates"] == 1


def test_a_version_1_json_state_is_migrated(tmp_path):
    state_dir = tmp_path / "st"
    state_dir.mkdir()
    old = {"version": 1, "rule": rule_settings(RULE, 0), "classifier": "", "sources": {}, "seen": ["id:x1"],
           "alerts_bytes": 0, "counts": {"records": 1}, "topics": {"oil": {"scores": [1.0], "n": 1,
                                                                             "alerting": False, "points": []}}}
    (state_dir / LEGACY_STATE_FILE).write_text(json.dumps(old))
    with Monitor(Stub(), state_dir, RULE, quiet=True) as mon:
        data = record(1, "oil", True, id="x1") + record(2, "oil", True, id="x2")
        assert mon.poll(["-"], stdin=io.BytesIO(data.encode())) == 1  # x1 was seen before the migration
    saved = saved_state(state_dir)
    assert saved["counts"]["records"] == 2 and saved["topics"]["oil"].scores == [1.0, 1.0]
    assert (state_dir / (LEGACY_STATE_FILE + ".migrated")).is_file() and not (state_dir / LEGACY_STATE_FILE).exists()
