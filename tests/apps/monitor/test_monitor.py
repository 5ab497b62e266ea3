"""The monitor: a restart equals one pass, follow mode and its chart, bad lines, the command end to end."""

import pytest

from palmkit.apps.monitor.chart import CHART_FILE
from palmkit.apps.monitor.monitor import Monitor, run
from palmkit.apps.monitor.records import RecordError
from palmkit.apps.monitor.state import ALERTS_FILE, saved_state
from palmkit.cli import main
from tests.apps.monitor.conftest import RULE, Stub, one_pass, shift_stream, write
from tests.conftest import finetuned_classifier


def test_restart_after_a_crash_equals_one_pass(tmp_path, capsys):
    stream = write(tmp_path / "s.jsonl", shift_stream(30, 8) + shift_stream(20, 6))
    one_pass(tmp_path, stream, "once")
    with pytest.raises(KeyboardInterrupt):
        one_pass(tmp_path, stream, "twice", Stub(fail_at=6))  # 5 batches of 8 committed
    assert saved_state(tmp_path / "twice")["counts"]["records"] == 40
    # A crash between appending a batch's alerts and committing the batch leaves lines that the restart removes
    with Monitor(Stub(), tmp_path / "twice", RULE, batch_size=8, quiet=True) as mon:
        commit = mon.store.commit

        def crash_after_alerts(batch):
            if mon.store.pending:
                raise KeyboardInterrupt
            commit(batch)
        mon.store.commit = crash_after_alerts
        with pytest.raises(KeyboardInterrupt):
            mon.poll([str(stream)])
    assert (tmp_path / "twice" / ALERTS_FILE).stat().st_size > saved_state(tmp_path / "twice")["alerts_bytes"]
    mon = one_pass(tmp_path, stream, "twice")
    assert " bytes of alerts from an uncommitted batch" in capsys.readouterr().err
    a, b = (saved_state(tmp_path / d) for d in ("once", "twice"))
    assert a["counts"] == b["counts"] and a["counts"]["records"] == len(stream.read_text().splitlines())
    assert a["topics"] == b["topics"] and a["counts"]["alerts"] >= 2
    assert (tmp_path / "once" / ALERTS_FILE).read_bytes() == (tmp_path / "twice" / ALERTS_FILE).read_bytes()
    assert 0 < mon.new["records"] < 128 - 40
    assert one_pass(tmp_path, stream, "twice").new["records"] == 0  # a third run: nothing new


def test_follow_mode_runs_polls_and_writes_the_chart(tmp_path):
    stream = write(tmp_path / "s.jsonl", shift_stream())
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True) as mon:
        summary = run(mon, [str(stream)], follow=True, poll_seconds=0, polls=3)
    assert summary.startswith("52 new records (0 bad lines skipped, 0 duplicates); 1 new alerts")
    png = tmp_path / "st" / CHART_FILE
    assert f"chart:  {png}" in summary and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(png).shape[0] > 300  # two panels


def test_bad_lines_are_skipped_and_reported(tmp_path, capsys):
    good = shift_stream()[:6]
    stream = tmp_path / "s.jsonl"
    stream.write_bytes("".join(good[:3]).encode() + b'{"time": "2005-01-01", "topic": "a", "text": "caf\xe9"}\n'
                       + b'{"time": "2005-01-01", "topic": "a"}\n\n' + "".join(good[3:]).encode() + b"not json")
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True) as mon:
        assert mon.poll([str(stream)]) == 6
    err = capsys.readouterr().err
    assert f"warning: {stream}:4: not valid UTF-8 (byte 0xe9 at column 50) (skipped)" in err
    assert f"warning: {stream}:5: missing field 'text' (skipped)" in err
    assert f"warning: {stream}:10: not JSON: Expecting value at column 1 (skipped)" in err
    assert mon.state["counts"]["bad_lines"] == 3
    with Monitor(Stub(), tmp_path / "strict", RULE, strict=True, quiet=True) as mon:
        with pytest.raises(RecordError, match=f"^{stream}:4: not valid UTF-8"):
            mon.poll([str(stream)])


@pytest.fixture(scope="module")
def tweet_classifier(checkpoint, tmp_path_factory):
    """The tiny random model fine-tuned for a couple of steps on the tweets slice in the test fixtures."""
    return finetuned_classifier(checkpoint, tmp_path_factory.mktemp("clf") / "tweets", "tweets-en", batch_size=16,
                                max_len=32)


def test_monitor_command_end_to_end(tmp_path, tweet_classifier, capsys):
    stream = write(tmp_path / "s.jsonl", shift_stream(10, 2))
    args = ["monitor", "--checkpoint", str(tweet_classifier), "--input", str(stream), "--state_dir",
            str(tmp_path / "st"), "--window", "2", "--baseline", "4", "--min_baseline", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "\n24 new records (0 bad lines skipped, 0 duplicates)" in "\n" + out
    assert f"chart:  {tmp_path / 'st' / CHART_FILE}" in out and (tmp_path / "st" / CHART_FILE).is_file()
    assert main(args) == 0 and capsys.readouterr().out.startswith("0 new records")  # no alert printed twice
    assert main([*args[:4], str(tmp_path / "missing.jsonl"), *args[5:]]) == 2
    assert capsys.readouterr().err.strip() == f"palmkit: error: input not found: {tmp_path / 'missing.jsonl'}"
