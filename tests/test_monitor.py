import io
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from palmkit.apps.monitor.demo import assign_topic, build_replay
from palmkit.apps.monitor.monitor import ALERTS_FILE, CHART_FILE, STATE_FILE, Monitor, run
from palmkit.apps.monitor.records import RecordError, negative_scores, parse_record, split_parts
from palmkit.apps.monitor.rule import Rule, Topic, format_alert, rolling_stats, update_topic
from palmkit.cli import main
from palmkit.errors import PalmkitError
from tests.conftest import finetuned_classifier

TASK_ROOT = Path(__file__).parent / "fixtures" / "tasks"
RULE = Rule(window=4, baseline=12, min_baseline=8, threshold=3.0, rearm=1.0, std_floor=0.05)


class Stub:
    """A classifier with the predict interface: negative iff the text says "bad"; counts its calls."""

    labels = ("negative", "neutral", "positive")

    def __init__(self, fail_at: int = 0):
        self.calls, self.fail_at = 0, fail_at

    def predict(self, texts):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt  # a monitor killed half-way
        return [("negative", {}) if "bad" in t else ("neutral", {}) for t in texts]


def record(i: int, topic: str, bad: bool, **extra) -> str:
    text = f"Item {i} about {topic} looks {'bad' if bad else 'fine'} today."
    return json.dumps({"time": f"2005-01-{1 + i // 24:02d}T{i % 24:02d}:00:00", "topic": topic, "text": text,
                       **extra}) + "\n"


def shift_stream(n_flat: int = 20, n_shift: int = 6) -> list[str]:
    """Topic "oil": one bad text in five, then a run of bad ones; topic "tech": one in five throughout."""
    lines = []
    for i in range(n_flat + n_shift):
        lines.append(record(2 * i, "oil", i % 5 == 0 or i >= n_flat))
        lines.append(record(2 * i + 1, "tech", i % 5 == 0))
    return lines


def write(path: Path, lines) -> Path:
    path.write_text("".join(lines), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------------
# The rule


def test_rolling_stats_match_a_hand_computation():
    rng = np.random.default_rng(0)
    scores = rng.random(30).round(3).tolist()
    st = rolling_stats(scores, RULE)
    window, base = np.array(scores[-4:]), np.array(scores[-16:-4])
    se = max(base.std(ddof=0) / math.sqrt(4), 0.05)
    assert st.share == pytest.approx(window.mean())
    assert st.mean == pytest.approx(base.mean()) and st.se == pytest.approx(se)
    assert st.z == pytest.approx((window.mean() - base.mean()) / se)
    # Too few texts for a window, then for a baseline; a constant baseline falls back on the floor
    assert rolling_stats(scores[:3], RULE) is None
    assert rolling_stats(scores[:11], RULE).z is None and rolling_stats(scores[:12], RULE).z is not None
    st = rolling_stats([0.0] * 10 + [1, 1, 0, 1], RULE)
    assert st.se == 0.05 and st.z == pytest.approx(0.75 / 0.05)


def test_alert_fires_on_a_shift_and_not_on_a_flat_topic():
    oil, tech, alerts = Topic(), Topic(), []
    for line in shift_stream():
        rec = parse_record(line.encode(), "x:1")
        topic = oil if rec.topic == "oil" else tech
        alert = update_topic(topic, rec.topic, float("bad" in rec.text), rec.time, RULE)
        alerts += [alert] if alert else []
    assert [a["topic"] for a in alerts] == ["oil"]
    a = alerts[0]
    # The third bad text in a row (the 23rd): window [0, 1, 1, 1] against the 12 texts before it, 2 of them bad;
    # the second bad text in a row gave z = 1.79 only
    se = math.sqrt(1 / 6 * 5 / 6) / 2
    assert a["items"] == 23 and a["share"] == 0.75 and a["baseline"] == pytest.approx(1 / 6)
    assert a["se"] == pytest.approx(se) and a["z"] == pytest.approx((0.75 - 1 / 6) / se)
    assert format_alert(a) == ("2005-01-02T20:00 ALERT oil: negative share 0.75 vs baseline 0.17 ± 0.19 "
                               "(z = 3.1, last 4 of 23 items)")
    assert tech.n == 26 and not tech.alerting and len(tech.points) == 23


def test_hysteresis_one_alert_per_episode():
    topic, fired = Topic(), []
    pattern = [0.0] * 12 + [1.0] * 8 + [0.0] * 12 + [1.0] * 4
    for i, s in enumerate(pattern):
        if update_topic(topic, "t", s, parse_record(record(i, "t", False).encode(), "x:1").time, RULE):
            fired.append(i)
    # Each episode alerts once, although z stays above the threshold for several texts in the first one. By hand:
    # text 12: window [0, 0, 0, 1], baseline all 0 -> se = floor 0.05, z = 5; z then stays >= 1 (rearm) until
    # the zeros return; text 34: window 0.75 vs a baseline with one 1 in 12 -> z = 4.8.
    assert fired == [12, 34]
    zs = [p[3] for p in topic.points if p[3] is not None]
    assert sum(z >= RULE.threshold for z in zs) > 2


# --------------------------------------------------------------------------------------------------
# Records and scoring


def test_parse_record_and_errors_name_the_line():
    rec = parse_record(b'{"time": "2005-03-14T10:00:00+01:00", "topic": " oil ", "text": "t", "id": 7}', "f:3")
    assert rec.time.isoformat() == "2005-03-14T09:00:00" and rec.topic == "oil" and rec.id == "7"
    cases = {b"\xff{}": "f:3: not valid UTF-8 (byte 0xff at column 1)",
             b'{"time": 1': "f:3: not JSON: Expecting ',' delimiter at column 11",
             b"[1]": "f:3: expected a JSON object, got list",
             b'{"time": "2005-01-01", "text": "x"}': "f:3: missing field 'topic'",
             b'{"time": "yesterday", "topic": "a", "text": "x"}': "f:3: bad time 'yesterday': expected ISO-8601 "
                                                                  "such as 2005-03-14T09:00:00Z",
             b'{"time": "2005-01-01", "topic": "a", "text": " "}': "f:3: 'text' must be a non-empty string"}
    for raw, message in cases.items():
        with pytest.raises(RecordError) as exc:
            parse_record(raw, "f:3")
        assert str(exc.value) == message


def test_sentences_and_negative_share():
    text = "Oil prices hit bad record.\nFirms said output rose 3% in 2004. Shares fell badly on Monday. Up 2%."
    assert split_parts(text) == ["Oil prices hit bad record.", "Firms said output rose 3% in 2004.",
                                 "Shares fell badly on Monday. Up 2%."]
    assert negative_scores(Stub(), [text, "all fine", "bad"]) == [pytest.approx(2 / 3), 0.0, 1.0]
    assert negative_scores(Stub(), [text], max_parts=1) == [1.0]


# --------------------------------------------------------------------------------------------------
# The monitor over files, folders and stdin


def one_pass(tmp_path: Path, stream: Path, name: str, classifier=None, **kw) -> Monitor:
    with Monitor(classifier or Stub(), tmp_path / name, RULE, batch_size=8, quiet=True, **kw) as mon:
        mon.poll([str(stream)])
    return mon


def test_restart_after_a_crash_equals_one_pass(tmp_path, capsys):
    stream = write(tmp_path / "s.jsonl", shift_stream(30, 8) + shift_stream(20, 6))
    one_pass(tmp_path, stream, "once")
    with pytest.raises(KeyboardInterrupt):
        one_pass(tmp_path, stream, "twice", Stub(fail_at=6))  # 5 batches of 8 committed
    state = json.loads((tmp_path / "twice" / STATE_FILE).read_text())
    assert state["counts"]["records"] == 40
    # A crash between appending an alert and committing the state leaves a line that the restart removes
    with open(tmp_path / "twice" / ALERTS_FILE, "a") as f:
        f.write('{"torn": "alert from an uncommitted batch"}\n')
    mon = one_pass(tmp_path, stream, "twice")
    assert "removing 44 bytes of alerts from an uncommitted batch" in capsys.readouterr().err
    a, b = (json.loads((tmp_path / d / STATE_FILE).read_text()) for d in ("once", "twice"))
    assert a["counts"] == b["counts"] and a["counts"]["records"] == len(stream.read_text().splitlines())
    assert a["topics"] == b["topics"] and a["counts"]["alerts"] >= 2
    assert (tmp_path / "once" / ALERTS_FILE).read_bytes() == (tmp_path / "twice" / ALERTS_FILE).read_bytes()
    assert mon.new["records"] == 128 - 40
    assert one_pass(tmp_path, stream, "twice").new["records"] == 0  # a third run: nothing new


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


def test_follow_mode_runs_polls_and_writes_the_chart(tmp_path):
    stream = write(tmp_path / "s.jsonl", shift_stream())
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True) as mon:
        summary = run(mon, [str(stream)], follow=True, poll_seconds=0, polls=3)
    assert summary.startswith("52 new records (0 bad lines skipped, 0 duplicates); 1 new alerts")
    png = tmp_path / "st" / CHART_FILE
    assert f"chart:  {png}" in summary and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    assert imread(png).shape[0] > 300  # two panels


def test_stdin_input_and_duplicates(tmp_path):
    data = "".join(shift_stream()[:20]).encode() + record(99, "oil", True, id="x1").encode()
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True) as mon:
        assert mon.poll(["-"], stdin=io.BytesIO(data)) == 21
    # Stdin has no offsets: a replay is recognised by ids, or by content where there is none
    with Monitor(Stub(), tmp_path / "st", RULE, quiet=True) as mon:
        more = record(100, "oil", False, id="x1") + record(101, "oil", False)
        assert mon.poll(["-"], stdin=io.BytesIO(data + more.encode())) == 1
        assert mon.new["duplicates"] == 22


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


def test_a_replaced_input_is_not_read_twice(tmp_path):
    stream = write(tmp_path / "s.jsonl", shift_stream())
    one_pass(tmp_path, stream, "st")
    write(stream, shift_stream()[::-1])
    with pytest.raises(PalmkitError, match=r"changed before byte \d+ .* would count texts twice"):
        one_pass(tmp_path, stream, "st")


# --------------------------------------------------------------------------------------------------
# The demo's replay and the command end to end


def test_replay_builder_on_bbc_like_articles(tmp_path):
    folder = tmp_path / "business"
    folder.mkdir()
    articles = {"001.txt": "Oil price hits record\n\nCrude oil rose to $55 a barrel, costing BA £40m.",
                "002.txt": "Bank cuts jobs\n\nThe lender said loans fell.",
                "003.txt": "Quiet day\n\nNothing happened at all."}
    for name, text in articles.items():
        (folder / name).write_bytes(text.encode("latin-1"))
    out = tmp_path / "stream.jsonl"
    topics = build_replay(folder, out, seed=1)
    assert topics == {"energy": 1, "banking": 1, "other": 1}
    recs = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in recs] == ["business/001", "business/002", "business/003"]
    assert "£40m" in recs[0]["text"] and recs[0]["time"] == "2005-01-03T08:00:00"
    assert recs[0]["time"] < recs[1]["time"] < recs[2]["time"]
    first = out.read_bytes()
    build_replay(folder, out, seed=1)
    assert out.read_bytes() == first  # seeded: a rebuilt replay matches the monitor's saved offsets
    assert assign_topic("Bank results\nOil oil oil.") == "energy"  # 3 = 3: a tie goes to the rule listed first
    assert assign_topic("Stocks rally\nThe economy grew.") == "markets"


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


def test_recipe_on_a_tiny_model_and_fake_articles(tmp_path, checkpoint, monkeypatch, capsys):
    from palmkit.apps.monitor.demo import recipe

    folder = tmp_path / "business"
    folder.mkdir()
    for i in range(12):
        text = f"Oil firm {i} reports\n\nCrude output rose. Shares in the energy firm moved {i}%."
        (folder / f"{i:03d}.txt").write_bytes(text.encode("latin-1"))
    monkeypatch.setenv("PALMKIT_TASK_DATA", str(TASK_ROOT))
    base = tmp_path / "base"
    shutil.copytree(checkpoint, base)
    options = dict(checkpoint=str(base), out=str(tmp_path / "run"), articles=str(folder), window=2,
                   baseline=4, min_baseline=2)
    first = recipe(**options)
    assert "\n12 new records (0 bad lines skipped, 0 duplicates)" in first and "energy           12 texts" in first
    assert "fine-tuned" in capsys.readouterr().out
    assert (tmp_path / "run" / "state" / CHART_FILE).is_file() and (tmp_path / "run" / "classifier.done.json").is_file()
    second = recipe(**options)  # everything cached; the monitor resumes and finds nothing new
    out = capsys.readouterr().out
    assert "(cached" in out and "settings changed" not in out
    assert "\n0 new records" in second and "in all 12 records" in second
    third = recipe(**{**options, "window": 3})  # another rule: a fresh monitor state, not an error
    assert "settings changed" in capsys.readouterr().out and "\n12 new records" in third
    os.utime(base / "model.safetensors", ns=(0, 0))  # the base pretrained again: the classifier is tuned again
    recipe(**{**options, "window": 3})
    assert "(fine-tuned" in capsys.readouterr().out
