"""The monitor's chart: each topic's negative share over time, with its baseline and its alerts.

A panel per topic costs its drawing time on every poll, and a feed can name hundreds of topics (300 took 42 s a
redraw): the chart shows the MAX_PANELS topics that most need a look (alerting now, then the most recent alert,
then the highest negative share), and says how many it leaves out; alerts.jsonl has every topic's alerts.
"""

from __future__ import annotations

import io
from datetime import datetime
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from palmkit.apps.monitor.rule import Rule, Topic
from palmkit.io import atomic_write_bytes

CHART_FILE = "sentiment.png"
MAX_PANELS = 12


def shown_topics(topics: dict[str, Topic], alerts: list[dict], limit: int = MAX_PANELS) -> list[str]:
    """The topics with chart points worth a panel, at most `limit`, in name order (module docstring)."""
    last_alert: dict[str, str] = {}
    for a in alerts:
        last_alert[a["topic"]] = max(last_alert.get(a["topic"], ""), a["time"])
    names = [t for t in topics if topics[t].points] or list(topics)

    # alerting now first, then those that alerted (the latest alert first), then by their last share
    ranked = sorted(names, key=lambda t: (not topics[t].alerting, t not in last_alert,
                                          _desc(last_alert.get(t, "")), -(topics[t].points[-1][1]
                                                                         if topics[t].points else 0.0), t))
    return sorted(ranked[:limit])


def _desc(text: str) -> tuple[int, ...]:
    return tuple(-ord(c) for c in text)


def plot_topics(topics: dict[str, Topic], alerts: list[dict], path: Path, rule: Rule) -> Path:
    """One panel per topic shown (`shown_topics`): the rolling negative share, its baseline mean, and red marks at
    alerts."""

    names = shown_topics(topics, alerts)
    left_out = len([t for t in topics if topics[t].points] or topics) - len(names)
    fig = Figure(figsize=(10, 1.9 * max(1, len(names)) + 0.8))
    axes = fig.subplots(max(1, len(names)), 1, sharex=True, squeeze=False)
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
    more = f"; {left_out} more topics not shown, see alerts.jsonl" if left_out > 0 else ""
    axes[0, 0].set_title(f"Negative share per topic (alert: z >= {rule.threshold:g} over a baseline of "
                         f"{rule.baseline} texts{more})")
    if names:  # one legend for all panels, with the alert mark even where the first panel has none
        handles = [Line2D([], [], color="tab:blue", lw=1.2), Line2D([], [], color="grey", lw=1, ls="--"),
                   Line2D([], [], color="tab:red", marker="v", ls="")]
        axes[0, 0].legend(handles, [f"negative share (last {rule.window})", "baseline mean", "alert"],
                          loc="upper left", fontsize=7, ncols=3)
    fig.autofmt_xdate()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    atomic_write_bytes(path, buf.getvalue())
    return path
