"""The alert rule, per topic, on the scores s_1, s_2, ... of its texts in arrival order:

    share  = mean of the last W scores                              (W = --window)
    m, sd  = mean and standard deviation of the up to B scores      (B = --baseline)
             just before those W (at least --min_baseline of them)
    se     = max(sd / sqrt(W), --std_floor)    # the spread of a W-text share if nothing changed
    z      = (share - m) / se
    ALERT when z >= --threshold; the topic then stays quiet until z falls below --rearm (hysteresis).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import NamedTuple

from palmkit.errors import PalmkitError

CHART_POINTS = 20_000  # per topic: the chart's history is kept in the state, so it is capped


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
            raise PalmkitError("need window >= 1 and baseline >= min_baseline >= 2")
        if not self.rearm < self.threshold or self.std_floor <= 0:
            raise PalmkitError("need rearm < threshold and std_floor > 0")


def rule_settings(rule: Rule, max_parts: int) -> dict:
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
