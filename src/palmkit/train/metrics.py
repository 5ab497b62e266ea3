"""Metrics a person can look at: a JSONL log, TensorBoard events and PNG plots."""

from __future__ import annotations

import json
import os
from pathlib import Path

from matplotlib.figure import Figure
from torch.utils.tensorboard import SummaryWriter

from palmkit.io import atomic_write_bytes, jsonl_rows


class MetricsLog:
    """Appends one JSON object per record to `metrics.jsonl` and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | os.PathLike, tensorboard: bool = True, truncate_after_step: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # On resume, drop records past the checkpoint: those steps are trained again.
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= truncate_after_step]
            atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())  # a crash keeps all
        self.file = open(self.path, "a", encoding="utf-8")
        self.tb = None
        if tensorboard:
            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=truncate_after_step)

    def log(self, record: dict) -> None:
        """Write one record; numeric fields also go to TensorBoard under their names."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if isinstance(v, int | float) and k != "step":
                    self.tb.add_scalar(k, v, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Records of a metrics.jsonl file (a torn last line from a crash is ignored)."""
    with open(path, encoding="utf-8") as f:
        return [row for _, row in jsonl_rows(f, path, skip_bad=True)]


def plot_curves(series: dict[str, tuple[list[float], list[float]]], out: str | os.PathLike, title: str,
                ylabel: str = "loss", xlabel: str = "step") -> Path:
    """Line plot of named (x, y) series into a PNG."""
    # a bare Figure draws without pyplot's global state or a display backend, as every palmkit plot does
    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, label=name, marker="o" if len(xs) < 30 else None, markersize=3)
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    return out


def plot_run(run_dir: str, out: str = "") -> str:
    """Write a PNG of training loss and per-language validation loss of a run; returns its path.

    Args:
        run_dir: a pretraining run folder (with metrics.jsonl)
        out: the PNG file; default: RUN_DIR/loss.png
    """
    run = Path(run_dir)
    records = read_metrics(run / "metrics.jsonl") if (run / "metrics.jsonl").is_file() else []
    if not records:
        raise FileNotFoundError(f"no metrics in {run / 'metrics.jsonl'}")
    series: dict[str, tuple[list[float], list[float]]] = {}
    for r in records:
        if "loss" in r:
            series.setdefault("train", ([], []))
            series["train"][0].append(r["step"])
            series["train"][1].append(r["loss"])
        for k, v in r.items():
            if k.startswith("val/") and k.endswith("/loss"):
                series.setdefault(k[4:-5] + " (val)", ([], []))
                series[k[4:-5] + " (val)"][0].append(r["step"])
                series[k[4:-5] + " (val)"][1].append(v)
    return str(plot_curves(series, out or run / "loss.png", f"{run.name}: loss", "cross-entropy (nats)"))
