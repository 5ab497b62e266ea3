"""The monitor's state folder: state.json (what was read and scored), alerts.jsonl, and the lock that keeps one
monitor per folder. state.json is written atomically after every batch, after the batch's alerts were appended,
so a restart resumes exactly: nothing is counted twice, and alerts of a batch that was never committed are removed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import IO

from palmkit.apps.monitor.rule import Rule, Topic, rule_settings
from palmkit.errors import PalmkitError
from palmkit.io import atomic_write_json, warn

STATE_VERSION = 1
STATE_FILE, ALERTS_FILE, LOCK_FILE = "state.json", "alerts.jsonl", ".lock"


def lock(state_dir: Path) -> IO:
    """The state folder's lock file, locked: held while a monitor lives (closing it releases the lock)."""
    handle = open(state_dir / LOCK_FILE, "w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise PalmkitError(f"another monitor is running on {state_dir} (its {LOCK_FILE} is locked)") from None
    return handle


def load_state(path: Path, rule: dict, classifier_id: str) -> dict:
    """The saved state at `path`, or a new one; refused when corrupt or made with another rule (left as it is)."""
    if not path.exists():
        return {"version": STATE_VERSION, "rule": rule, "classifier": classifier_id, "sources": {},
                "seen": [], "alerts_bytes": 0, "counts": {}, "topics": {}}
    where = f"state file {path}"
    try:
        state = json.loads(path.read_bytes())
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise PalmkitError(f"not a version {STATE_VERSION} monitor state")
        missing = [k for k in ("rule", "sources", "seen", "alerts_bytes", "counts", "topics") if k not in state]
        if missing:
            raise KeyError(", ".join(missing))
        state["topics"] = {k: Topic(**v) for k, v in state["topics"].items()}
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise PalmkitError(f"{where} is corrupt ({exc.__class__.__name__}: {exc}); it was left as it is: "
                           "repair or remove it, or use another --state_dir") from None
    if state["rule"] != rule:
        diff = ", ".join(f"{k}={v}" for k, v in state["rule"].items() if rule.get(k) != v)
        raise PalmkitError(f"{where} was made with a different rule ({diff}): pass the same options, "
                           "or use another --state_dir")
    if classifier_id and state.get("classifier") and state["classifier"] != classifier_id:
        warn(f"the classifier differs from the one that scored the {sum(t.n for t in state['topics'].values())}"
             " texts in the state: scores before and after are not comparable")
    return state


def save_state(path: Path, state: dict) -> None:
    atomic_write_json(path, {**state, "topics": {k: asdict(v) for k, v in state["topics"].items()}})


def reconcile_alerts(alerts_path: Path, state: dict) -> None:
    """Drop alert lines that a batch appended but never committed (a crash between the two writes)."""
    size = alerts_path.stat().st_size if alerts_path.exists() else 0
    committed = state["alerts_bytes"]
    if size > committed:
        warn(f"{alerts_path}: removing {size - committed} bytes of alerts from an uncommitted batch")
        with open(alerts_path, "r+b") as f:
            f.truncate(committed)
    elif size < committed:
        warn(f"{alerts_path} is shorter than the state records (edited or removed?); appending to it")
        state["alerts_bytes"] = size


def classifier_id(path: Path) -> str:
    """Identifies a classifier folder by its head's bytes: a re-tuned model gets a new id."""
    head = path / "head.safetensors"
    digest = hashlib.blake2b(head.read_bytes(), digest_size=8).hexdigest() if head.is_file() else "?"
    return f"{path}#{digest}"



def is_stale(state_dir: Path, rule: Rule, max_parts: int, cid: str) -> bool:
    """True when a saved monitor state was made with other settings (a corrupt one is left to Monitor to report)."""
    try:
        state = json.loads((state_dir / STATE_FILE).read_bytes())
    except (OSError, ValueError):
        return False
    return not isinstance(state, dict) or state.get("rule") != rule_settings(rule, max_parts) or \
        state.get("classifier") != cid
