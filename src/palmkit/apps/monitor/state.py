"""The monitor's state folder: state.sqlite (what was read and scored), alerts.jsonl, and the lock that keeps one
monitor per folder.

The state is an SQLite database in WAL mode, and a batch commits only what it changed (its ids, the topics it
touched, their new chart points, the file's offset) in one transaction, so a commit costs the same after a
million records as after ten. It stays bounded: each file is known by its byte offset, each topic keeps the
scores the rule needs and at most CHART_POINTS chart points, and only the last `seen_window` record ids are kept
for recognising re-delivered records (an id older than that is taken as new: a producer re-sends what it sent
recently, and a file is never re-read thanks to its offset, so the window bounds memory without letting a
restart count anything twice).

alerts.jsonl is appended before the batch is committed. Its bytes are the monitor's only while it can prove it
wrote them: the committed length, and the batch's alert lines recorded in the state just before they are
appended. On start, a tail that is (a prefix of) those lines is removed (a crash between append and commit);
any other tail, or a file that predates the state, is kept and new alerts are appended after it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from palmkit.apps.monitor.rule import CHART_POINTS, Rule, Topic, rule_settings
from palmkit.errors import PalmkitError
from palmkit.io import warn

STATE_VERSION = 2
STATE_FILE, ALERTS_FILE, LOCK_FILE = "state.sqlite", "alerts.jsonl", ".lock"
LEGACY_STATE_FILE = "state.json"  # version 1: the whole state as JSON, rewritten after every batch
SEEN_WINDOW = 100_000  # record ids remembered for recognising re-deliveries

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sources (path TEXT PRIMARY KEY, "offset" INTEGER NOT NULL, line INTEGER NOT NULL,
                                    head TEXT NOT NULL, inode INTEGER);
CREATE TABLE IF NOT EXISTS seen (seq INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE);
CREATE TABLE IF NOT EXISTS topics (name TEXT PRIMARY KEY, scores TEXT NOT NULL, n INTEGER NOT NULL,
                                   alerting INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS points (topic TEXT NOT NULL, seq INTEGER NOT NULL, time TEXT NOT NULL, share REAL,
                                   mean REAL, z REAL, PRIMARY KEY (topic, seq));
"""


def lock(state_dir: Path) -> IO:
    """The state folder's lock file, locked: held while a monitor lives (closing it releases the lock)."""
    handle = open(state_dir / LOCK_FILE, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PalmkitError(f"another monitor is running on {state_dir} (its {LOCK_FILE} is locked)") from None
    return handle


def _corrupt(path: Path, exc: BaseException) -> PalmkitError:
    return PalmkitError(
        f"state file {path} is corrupt ({exc.__class__.__name__}: {exc}); it was left as it is: repair it, or use "
        f"another --state_dir; removing it (and its -wal and -shm files) starts the monitor afresh: {ALERTS_FILE} "
        "is kept and new alerts are appended to it, but every input is then read again from its start")


class Batch:
    """What one batch changed, committed together by `StateStore.commit`."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.topics: set[str] = set()
        self.points: list[tuple[str, int, list]] = []  # (topic, its item count at the point, the point)
        self.source: tuple[str, dict] | None = None


class StateStore:
    """The monitor's state: loaded into `state` (rule, classifier, sources, counts, topics, alerts_bytes) and
    `seen`, and written back a batch at a time."""

    def __init__(self, state_dir: Path, rule: dict, classifier_id: str, seen_window: int = SEEN_WINDOW):
        self.path, self.seen_window = state_dir / STATE_FILE, max(1, seen_window)
        legacy = state_dir / LEGACY_STATE_FILE
        fresh = not self.path.exists()
        old = _read_legacy(legacy) if fresh and legacy.exists() else None
        self.db = None
        try:
            if not fresh:
                _check_header(self.path)
            self.db = sqlite3.connect(self.path, isolation_level=None)  # transactions are explicit
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a committed batch survives a power cut
            if fresh:
                self._create(old or {"rule": rule, "classifier": classifier_id, "sources": {}, "seen": [],
                                     "alerts_bytes": 0, "counts": {}, "topics": {}})
            self.state, self.seen, self.pending = self._load()
        except sqlite3.DatabaseError as exc:
            self.close()
            raise _corrupt(self.path, exc) from None
        except BaseException:
            self.close()
            raise
        if fresh and legacy.exists():  # migrated: the JSON state is no longer read
            os.replace(legacy, legacy.with_name(LEGACY_STATE_FILE + ".migrated"))
        where = f"state file {self.path}"
        if self.state["rule"] != rule:
            diff = ", ".join(f"{k}={v}" for k, v in self.state["rule"].items() if rule.get(k) != v)
            self.close()
            raise PalmkitError(f"{where} was made with a different rule ({diff}): pass the same options, "
                               "or use another --state_dir")
        saved = self.state.get("classifier")
        if classifier_id and saved and saved != classifier_id:
            texts = sum(t.n for t in self.state["topics"].values())
            warn(f"the classifier differs from the one that scored the {texts} texts in the state: scores before "
                 "and after are not comparable")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def _set(self, **values) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(k, json.dumps(v, ensure_ascii=False)) for k, v in values.items()])

    def _create(self, state: dict) -> None:
        with self.transaction():  # the tables too: a database without its meta rows is never left behind
            for statement in _SCHEMA.split(";"):
                self.db.execute(statement)
            self._set(version=STATE_VERSION, rule=state["rule"], classifier=state.get("classifier", ""),
                      alerts_bytes=state["alerts_bytes"], counts=state["counts"], pending_alerts="")
            for path, s in state["sources"].items():
                self._save_source(path, s)
            self.db.executemany("INSERT OR IGNORE INTO seen (key) VALUES (?)",
                                [(k,) for k in state["seen"][-self.seen_window:]])
            for name, topic in state["topics"].items():
                self._save_topic(name, topic)
                first = topic.n - len(topic.points) + 1
                self.db.executemany("INSERT INTO points VALUES (?, ?, ?, ?, ?, ?)",
                                    [(name, first + i, *p) for i, p in enumerate(topic.points)])

    def _load(self) -> tuple[dict, dict[str, None], bytes]:
        state, pending = _read(self.db)
        seen = dict.fromkeys(k for (k,) in self.db.execute("SELECT key FROM seen ORDER BY seq"))
        return state, seen, bytes.fromhex(pending)

    def _save_source(self, path: str, s: dict) -> None:
        self.db.execute("INSERT OR REPLACE INTO sources VALUES (?, ?, ?, ?, ?)",
                        (path, s["offset"], s["line"], s["head"], s.get("inode")))

    def _save_topic(self, name: str, t: Topic) -> None:
        self.db.execute("INSERT OR REPLACE INTO topics VALUES (?, ?, ?, ?)",
                        (name, json.dumps(t.scores), t.n, int(t.alerting)))

    def remember(self, key: str) -> bool:
        """Add a record id; False when it is among the last `seen_window` ids (a re-delivery)."""
        if key in self.seen:
            return False
        self.seen[key] = None
        if len(self.seen) > self.seen_window:
            del self.seen[next(iter(self.seen))]
        return True

    def set_pending(self, data: bytes) -> None:
        """Record alert lines about to be appended: what a restart may remove if the batch never commits."""
        with self.transaction():
            self._set(pending_alerts=data.hex())
        self.pending = data

    def commit(self, batch: Batch) -> None:
        """Write what a batch changed, with the counts and the committed length of alerts.jsonl."""
        with self.transaction():
            self._set(counts=self.state["counts"], alerts_bytes=self.state["alerts_bytes"], pending_alerts="")
            if batch.seen:
                self.db.executemany("INSERT OR IGNORE INTO seen (key) VALUES (?)", [(k,) for k in batch.seen])
                self.db.execute("DELETE FROM seen WHERE seq <= (SELECT max(seq) FROM seen) - ?", (self.seen_window,))
            for name in batch.topics:
                self._save_topic(name, self.state["topics"][name])
            if batch.points:
                self.db.executemany("INSERT OR REPLACE INTO points VALUES (?, ?, ?, ?, ?, ?)",
                                    [(name, seq, *p) for name, seq, p in batch.points])
                for name in {name for name, _, _ in batch.points}:
                    self.db.execute("DELETE FROM points WHERE topic = ? AND seq <= ?",
                                    (name, self.state["topics"][name].n - CHART_POINTS))
            if batch.source:
                self._save_source(*batch.source)
        self.pending = b""

    def save_source(self, path: str, s: dict) -> None:
        with self.transaction():
            self._save_source(path, s)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def _read(db: sqlite3.Connection) -> tuple[dict, str]:
    """(the state, the pending alert lines as hex) of a state database."""
    meta = {k: json.loads(v) for k, v in db.execute("SELECT key, value FROM meta")}
    missing = [k for k in ("version", "rule", "alerts_bytes", "counts") if k not in meta]
    if missing:
        raise sqlite3.DatabaseError(f"no {', '.join(missing)} in its meta table")
    if meta["version"] != STATE_VERSION:
        raise sqlite3.DatabaseError(f"not a version {STATE_VERSION} monitor state")
    topics = {}
    for name, scores, n, alerting in db.execute("SELECT name, scores, n, alerting FROM topics"):
        points = [list(p) for p in db.execute(
            "SELECT time, share, mean, z FROM points WHERE topic = ? ORDER BY seq", (name,))]
        topics[name] = Topic(json.loads(scores), n, bool(alerting), points)
    sources = {path: {"offset": offset, "line": line, "head": head, "inode": inode}
               for path, offset, line, head, inode in db.execute("SELECT * FROM sources")}
    state = {"rule": meta["rule"], "classifier": meta.get("classifier", ""), "sources": sources,
             "alerts_bytes": meta["alerts_bytes"], "counts": meta["counts"], "topics": topics}
    return state, meta.get("pending_alerts", "")


def _check_header(path: Path) -> None:
    """SQLite opens any file lazily; a file that is not a database is reported before anything touches it."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head != b"SQLite format 3\x00":
        raise sqlite3.DatabaseError("not an SQLite database")


def _read_legacy(path: Path) -> dict:
    """A version 1 state.json, for migration; refused as corrupt like the database."""
    try:
        state = json.loads(path.read_bytes())
        if not isinstance(state, dict) or state.get("version") != 1:
            raise PalmkitError("not a version 1 monitor state")
        missing = [k for k in ("rule", "sources", "seen", "alerts_bytes", "counts", "topics") if k not in state]
        if missing:
            raise KeyError(", ".join(missing))
        state["topics"] = {k: Topic(**v) for k, v in state["topics"].items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise _corrupt(path, exc) from None
    return state


def reconcile_alerts(alerts_path: Path, store: StateStore) -> None:
    """Remove alert lines that this monitor appended but never committed; keep everything else (see the module
    docstring), and continue after it."""
    state = store.state
    size = alerts_path.stat().st_size if alerts_path.exists() else 0
    committed = state["alerts_bytes"]
    if size > committed:
        with open(alerts_path, "r+b") as f:
            f.seek(committed)
            tail = f.read()
            if store.pending and store.pending.startswith(tail):
                warn(f"{alerts_path}: removing {size - committed} bytes of alerts from an uncommitted batch")
                f.truncate(committed)
                f.flush()
                os.fsync(f.fileno())
                size = committed
            else:
                warn(f"{alerts_path}: keeping {size - committed} bytes that this monitor did not write; new alerts "
                     "are appended after them")
    elif size < committed:
        warn(f"{alerts_path} is shorter than the state records (edited or removed?); appending to it")
    if size != committed or store.pending:
        state["alerts_bytes"] = size
        store.commit(Batch())


def saved_state(state_dir: Path) -> dict:
    """A read-only snapshot of a state folder's state (sources, counts, topics, alerts_bytes, rule, classifier)."""
    path = state_dir / STATE_FILE
    _check_header(path)
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        state, _ = _read(db)
        state["seen"] = db.execute("SELECT count(*) FROM seen").fetchone()[0]  # how many ids are remembered
    finally:
        db.close()
    return state


def classifier_id(path: Path) -> str:
    """Identifies a classifier folder by its head's bytes: a re-tuned model gets a new id."""
    head = path / "head.safetensors"
    digest = hashlib.blake2b(head.read_bytes(), digest_size=8).hexdigest() if head.is_file() else "?"
    return f"{path}#{digest}"


def is_stale(state_dir: Path, rule: Rule, max_parts: int, cid: str) -> bool:
    """True when a saved monitor state was made with other settings (a corrupt one is left to Monitor to report)."""
    if not (state_dir / STATE_FILE).is_file():
        return False
    try:
        state = saved_state(state_dir)
    except (OSError, ValueError, sqlite3.Error):
        return False
    return state["rule"] != rule_settings(rule, max_parts) or state["classifier"] != cid

