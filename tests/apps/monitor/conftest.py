"""What the monitor tests share: a small rule, a stub classifier, synthetic record streams, one monitor pass."""

import json
from pathlib import Path

from palmkit.apps.monitor.monitor import Monitor
from palmkit.apps.monitor.rule import Rule

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


def one_pass(tmp_path: Path, stream: Path, name: str, classifier=None, **kw) -> Monitor:
    with Monitor(classifier or Stub(), tmp_path / name, RULE, batch_size=8, quiet=True, **kw) as mon:
        mon.poll([str(stream)])
    return mon
