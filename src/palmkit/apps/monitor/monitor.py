"""Financial sentiment monitor: rolling negative share per topic, alerts, a chart, exact restarts.

    palmkit monitor --checkpoint runs/monitor/classifier --input stream.jsonl --state_dir runs/mon
    tail -f feed.jsonl | palmkit monitor --checkpoint CLF --input - --state_dir runs/mon
    palmkit monitor --checkpoint CLF --input inbox/ --state_dir runs/mon --follow     # poll a folder

Input: JSON lines {"time": ISO-8601, "topic": str, "text": str, "id": optional str or int}, from a file,
from stdin ("-"), or from a folder whose *.jsonl files are polled for new files and appended lines. A bad
line (not UTF-8, not JSON, a missing field, a bad time) is skipped with a warning that names file:line and
is counted; `--strict` stops at the first one instead. A record whose id was already processed is skipped
(re-delivery is safe). Times with a zone are converted to UTC; times without one are taken as UTC.

An alert is printed and appended to STATE_DIR/alerts.jsonl; STATE_DIR/sentiment.png charts the share of
every topic over time with its alerts marked. STATE_DIR/state.sqlite (one transaction per batch, holding only
what the batch changed) keeps each file's byte offset, each topic's recent scores and the recent record ids, so
a restart resumes exactly where the last run committed: nothing is counted twice, and alerts appended by a batch
that was not committed are removed (alerts the monitor cannot prove it wrote are never removed: see state.py).

A file that changed before the offset already read (replaced or edited) is an error, since reading it again
would count texts twice; with --follow that is how log rotation looks (renamed and started anew, or copied and
truncated), so such a file is read from its start instead, after the rest of the old file, still open, was read.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from palmkit.apps.monitor.chart import CHART_FILE, plot_topics
from palmkit.apps.monitor.records import Labeller, Record, RecordError, negative_scores, parse_record
from palmkit.apps.monitor.rule import Rule, Topic, format_alert, rule_settings, update_topic
from palmkit.apps.monitor.sources import STDIN, Line, batched, file_lines, fingerprint, input_files, stream_lines
from palmkit.apps.monitor.state import (
    ALERTS_FILE,
    SEEN_WINDOW,
    STATE_FILE,
    Batch,
    StateStore,
    classifier_id,
    lock,
    reconcile_alerts,
)
from palmkit.errors import PalmkitError
from palmkit.finetune.predict import load_classifier
from palmkit.io import jsonl_rows, warn

MAX_WARNINGS = 20  # bad lines beyond this are counted, not printed


class Monitor:
    """A stateful monitor over a state folder: `poll(inputs)` scores whatever is new and commits it."""

    def __init__(self, classifier: Labeller, state_dir: str | os.PathLike, rule: Rule = Rule(),
                 max_parts: int = 0, strict: bool = False, batch_size: int = 64, classifier_id: str = "",
                 quiet: bool = False, echo: bool = True, seen_window: int = SEEN_WINDOW):
        if "negative" not in classifier.labels:
            raise PalmkitError(f"the classifier has no 'negative' label (labels: {', '.join(classifier.labels)})")
        self.classifier, self.rule, self.max_parts, self.strict = classifier, rule, max_parts, strict
        self.batch_size, self.quiet, self.echo = max(1, batch_size), quiet, echo  # echo: print alerts as they fire
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._lock = lock(self.dir)
        self.store: StateStore | None = None
        self._followed: dict[str, BinaryIO] = {}  # files kept open while following, to finish them when rotated
        try:
            self.store = StateStore(self.dir, rule_settings(self.rule, self.max_parts), classifier_id, seen_window)
            reconcile_alerts(self.alerts_path, self.store)
        except BaseException:
            self.close()
            raise
        self.state = self.store.state
        self.new = Counter()  # this run's counts
        self.new_alerts: list[dict] = []

    # ---- state

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    @property
    def alerts_path(self) -> Path:
        return self.dir / ALERTS_FILE

    def close(self) -> None:
        for f in self._followed.values():
            f.close()
        self._followed.clear()
        if self.store is not None:
            self.store.close()
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
            warn(f"{exc} (skipped)")
        if self.new["bad_lines"] == MAX_WARNINGS:
            warn("further bad lines are counted, not shown")

    def _process(self, lines: list[Line], label: str, stdin: bool, source: BinaryIO | None = None) -> None:
        """Score a batch of lines of one source (`source`: the open file, for its offset), update the topics,
        append alerts, then commit the state."""
        batch = Batch()
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
                if not self.store.remember(key):
                    self._count("duplicates")
                    continue
                batch.seen.append(key)
            records.append(rec)
        scores = negative_scores(self.classifier, [r.text for r in records], self.max_parts)
        alerts = []
        for rec, score in zip(records, scores, strict=True):
            topic = self.state["topics"].setdefault(rec.topic, Topic())
            alert = update_topic(topic, rec.topic, score, rec.time, self.rule)
            batch.topics.add(rec.topic)
            if len(topic.scores) >= self.rule.window:  # the rule had its window: update_topic added a chart point
                batch.points.append((rec.topic, topic.n, topic.points[-1]))
            if alert is not None:
                alerts.append({**alert, "source": rec.where, **({"id": rec.id} if rec.id is not None else {})})
        self._count("records", len(records))
        if alerts:
            data = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in alerts).encode()
            self.store.set_pending(data)  # what a restart may remove, should this batch never commit
            with open(self.alerts_path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.state["alerts_bytes"] += len(data)
            self._count("alerts", len(alerts))
            self.new_alerts += alerts
        if source is not None and lines:
            key = str(Path(label).resolve())
            self.state["sources"][key] = {"offset": lines[-1].end, "line": lines[-1].lineno,
                                          "head": fingerprint(source, lines[-1].end),
                                          "inode": os.fstat(source.fileno()).st_ino}
            batch.source = (key, self.state["sources"][key])
        self.store.commit(batch)  # after the alerts: a crash in between leaves extra alert lines, removed on restart
        for a in alerts if self.echo else []:
            tqdm.write(format_alert(a))

    def _resume_point(self, path: Path, follow: bool) -> tuple[int, int]:
        """(byte offset, line number) already committed for a file; an error if it was not just appended to,
        unless following, where that is a rotation: the old file is finished and the new one read from 0."""
        key = str(path.resolve())
        saved = self.state["sources"].get(key)
        if not saved:
            return 0, 0
        offset, st = saved["offset"], path.stat()
        # What was read must still be there: a file rewritten whole with the same start (a new inode) is the same
        # stream, one that is shorter or starts otherwise is another.
        if st.st_size >= offset and fingerprint(path, offset) == saved["head"]:
            return offset, saved["line"]
        if not follow:
            raise PalmkitError(f"{path} changed before byte {offset} since it was read (replaced or edited, not "
                               f"appended to): reading it again would count texts twice; rename it or use "
                               "another --state_dir (with --follow a rotated file is read from its start)")
        old = self._followed.pop(key, None)
        if old is not None:
            with old:
                if os.fstat(old.fileno()).st_ino == saved.get("inode"):  # still the file that was read: finish it
                    for batch in batched(file_lines(old, offset, saved["line"], True), self.batch_size):
                        self._process(batch, str(path), stdin=False, source=old)
        warn(f"{path} was rotated (a new file or truncated): reading it from its start")
        self.state["sources"][key] = {"offset": 0, "line": 0, "head": fingerprint(path, 0), "inode": st.st_ino}
        self.store.save_source(key, self.state["sources"][key])
        return 0, 0

    @contextmanager
    def _open(self, path: Path, follow: bool) -> Iterator[BinaryIO]:
        """The file to read: opened for this poll, or, when following, kept open across polls (a rotated file
        is then still readable through it)."""
        if not follow:
            with open(path, "rb") as f:
                yield f
            return
        key = str(path.resolve())
        f = self._followed.get(key)
        if f is None or os.fstat(f.fileno()).st_ino != path.stat().st_ino:
            if f is not None:
                f.close()
            f = self._followed[key] = open(path, "rb")
        yield f

    def poll(self, inputs: Sequence[str], stdin: BinaryIO | None = None, final: bool = True) -> int:
        """Score every record that is new in `inputs` (files, folders, "-" for stdin); returns how many.

        final: a last line without a newline is read too; False when following growing files, which also follows
        rotated files (see the module docstring)."""
        before = self.new["records"]
        follow = not final
        files = [(p, *self._resume_point(p, follow)) for spec in inputs if spec != STDIN for p in input_files(spec)]
        for gone in self._followed.keys() - {str(p.resolve()) for p, _, _ in files}:  # removed from a folder
            self._followed.pop(gone).close()
        todo = sum(max(0, p.stat().st_size - offset) for p, offset, _ in files)
        with tqdm(total=todo, unit="B", unit_scale=True, desc="monitor", disable=self.quiet or None,
                  dynamic_ncols=True, leave=False) as bar:
            for path, offset, lineno in files:
                with self._open(path, follow) as f:
                    for batch in batched(file_lines(f, offset, lineno, final), self.batch_size):
                        self._process(batch, str(path), stdin=False, source=f)
                        bar.update(batch[-1].end - offset)
                        offset = batch[-1].end
                        bar.set_postfix(records=self.new["records"], alerts=len(self.new_alerts))
            if STDIN in inputs:
                for group in stream_lines(stdin or sys.stdin.buffer):
                    for batch in batched(iter(group), self.batch_size):
                        self._process(batch, "<stdin>", stdin=True)
        return self.new["records"] - before

    def alerts(self) -> list[dict]:
        """Every committed alert (of this run and earlier ones)."""
        if not self.alerts_path.exists():
            return []
        return [row for _, row in jsonl_rows(self.alerts_path.read_text(encoding="utf-8"), self.alerts_path)]

    def chart(self, path: str | os.PathLike = "") -> Path:
        """PNG of each topic's negative share over time with its baseline and alerts; written atomically."""
        return plot_topics(self.state["topics"], self.alerts(), Path(path or self.dir / CHART_FILE), self.rule)


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


def monitor(checkpoint: str, input: list[str] | str, state_dir: str, follow: bool = False,
            poll_seconds: float = 5.0, window: int = 10, baseline: int = 40, min_baseline: int = 20,
            threshold: float = 2.5, rearm: float = 1.0, std_floor: float = 0.05, max_parts: int = 0,
            strict: bool = False, batch_size: int = 64, chart: str = "", polls: int = 0,
            seen_window: int = SEEN_WINDOW) -> str:
    """Run the sentiment monitor on JSONL records {"time", "topic", "text", "id"?}; returns a summary.

    Alert rule per topic: share = negative share of the last WINDOW texts; m, sd = mean and std of the up to
    BASELINE scores before them; z = (share - m) / max(sd / sqrt(WINDOW), STD_FLOOR); alert when z >= THRESHOLD,
    then quiet until z < REARM. A text's score is its share of sentences labelled negative. Alerts are printed
    and appended to STATE_DIR/alerts.jsonl; a restart resumes exactly where the state says.

    Args:
        checkpoint: a 3-class sentiment classifier (negative, neutral, positive) from `palmkit finetune classify`
        input: where the records come from: a JSONL file, a folder of *.jsonl, or - (stdin); a list of several
        state_dir: folder of the monitor's state, alerts.jsonl and sentiment.png
        follow: keep polling the files and folders for new files and appended lines (Ctrl-C stops)
        poll_seconds: seconds between polls when following
        window: W: the watched share is taken over each topic's last W texts
        baseline: B: the baseline is the mean and std of the up to B scores before those
        min_baseline: no alert before a topic has this many baseline scores
        threshold: alert when z reaches this
        rearm: after an alert, the topic is quiet until z falls below this
        std_floor: the least standard error: a topic whose share never moved does not alert on noise
        max_parts: score only the first N sentences of each text; 0: all
        strict: stop at the first bad line instead of skipping and counting it
        batch_size: texts per forward pass of the classifier
        chart: the PNG chart (default: STATE_DIR/sentiment.png)
        polls: when following, stop after this many polls; 0: until Ctrl-C
        seen_window: how many recent record ids are remembered for skipping re-delivered records (files are
            never re-read anyway: their offsets are kept)
    """
    sources = [input] if isinstance(input, str) else input
    rule = Rule(window, baseline, min_baseline, threshold, rearm, std_floor)
    if STDIN in sources and follow:
        raise PalmkitError("--follow polls files and folders; stdin is read until it ends anyway")
    for spec in sources:
        if spec != STDIN and not Path(spec).exists():
            raise FileNotFoundError(f"input not found: {spec}")
    classifier = load_classifier(checkpoint)
    with Monitor(classifier, state_dir, rule, max_parts, strict, batch_size, classifier_id(Path(checkpoint)),
                 seen_window=seen_window) as mon:
        return run(mon, sources, follow, poll_seconds, chart, polls)


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


