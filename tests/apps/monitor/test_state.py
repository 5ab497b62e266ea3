"""The monitor's state folder: refused when corrupt or made with another rule, locked, and recognised as stale."""

import json

import pytest

from palmkit.apps.monitor.monitor import Monitor
from palmkit.apps.monitor.rule import Rule
from palmkit.apps.monitor.state import STATE_FILE, classifier_id, is_stale
from palmkit.errors import PalmkitError
from tests.apps.monitor.conftest import RULE, Stub, one_pass, shift_stream, write


def test_corrupt_or_mismatched_state_is_an_error_and_left_alone(tmp_path):
    stream = write(tmp_path / "s.jsonl", shift_stream())
    one_pass(tmp_path, stream, "st")
    state = tmp_path / "st" / STATE_FILE
    with pytest.raises(PalmkitError, match=r"was made with a different rule \(window=4"):
        Monitor(Stub(), tmp_path / "st", Rule())
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True):  # the lock: one monitor per state folder
        with pytest.raises(PalmkitError, match="another monitor is running"):
            Monitor(Stub(), tmp_path / "st", RULE)
    for broken in (b'{"version": 1, "rule"', b"[]", b'{"version": 1}'):
        state.write_bytes(broken)
        with pytest.raises(PalmkitError, match=f"state file {state} is corrupt .* it was left as it is"):
            Monitor(Stub(), tmp_path / "st", RULE)
        assert state.read_bytes() == broken


def test_a_state_made_with_other_settings_or_another_classifier_is_stale(tmp_path):
    stream = write(tmp_path / "s.jsonl", shift_stream())
    one_pass(tmp_path, stream, "st")
    state_dir = tmp_path / "st"
    saved = json.loads((state_dir / STATE_FILE).read_text())["classifier"]
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
