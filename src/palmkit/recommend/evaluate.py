"""One evaluation of the four rankings on the same temporal split: popularity, the retriever alone, the language
model alone and their combination, each ranking every item the user has not seen; a cold-start slice; the chart
and report.md.

Two stages share the language-model scorer (tuned on the training likes only). Validation stage: the retriever
and the like counts come from the training likes, and the combination is fitted on the validation items.
Test stage: the retriever and the counts are refitted on training + validation likes (everything before the
test items) and the fitted combination ranks the test items. Cold-start items are test items with fewer than
`cold_likes` likes in the test stage's fitting data: there the collaborative signal is thin and text is what
is left.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from palmkit.data.recommend import FeedbackSplit, Movie
from palmkit.io import atomic_write_bytes, atomic_write_json
from palmkit.recommend.combine import Combination
from palmkit.recommend.metrics import ranking_metrics, top_k
from palmkit.recommend.recommender import SYSTEMS, Recommender
from palmkit.recommend.retriever import Retriever, RetrieverConfig
from palmkit.recommend.scorer import TextScorer

LABELS = {"popularity": "popularity", "retriever": "retriever (ALS)", "lm": "language model",
          "combination": "combination"}


def like_counts(histories: dict[str, list[int]], n_items: int) -> np.ndarray:
    """Likes per item in the histories."""
    return np.bincount([i for h in histories.values() for i in h], minlength=n_items).astype(np.float64)


def stage_recommender(split: FeedbackSplit, movies: Sequence[Movie], stage: str, scorer: TextScorer | None,
                      cfg: RetrieverConfig, combination: Combination | None = None) -> Recommender:
    """The recommender of one stage: retriever and like counts fitted on the histories known before its targets
    (every like, for stage "all": the recommender a recipe saves)."""
    index = {m.item: i for i, m in enumerate(movies)}
    histories = {u: [index[i] for i in h] for u, h in split.histories(stage).items()}
    retriever = Retriever.fit(list(histories.values()), len(movies), cfg)
    return Recommender(movies, retriever, like_counts(histories, len(movies)), scorer, combination)


def _stage_data(split: FeedbackSplit, stage: str, index: dict[str, int]):
    users = list(split.targets(stage))
    histories = [[index[i] for i in split.history(u, stage)] for u in users]
    exclude = [sorted(index[i] for i in split.seen[stage][u]) for u in users]
    targets = [{index[i] for i in split.targets(stage)[u]} for u in users]
    return users, histories, exclude, targets


def evaluate_split(split: FeedbackSplit, movies: Sequence[Movie], scorer: TextScorer | None,
                   cfg: RetrieverConfig = RetrieverConfig(), k: int = 10, cold_likes: int = 5
                   ) -> tuple[dict, Combination]:
    """Metrics of every system on the test stage (all users, and the cold-start slice) and the combination fitted
    on the validation stage."""
    index = {m.item: i for i, m in enumerate(movies)}
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    valid = stage_recommender(split, movies, "valid", scorer, cfg)
    _, histories, exclude, targets = _stage_data(split, "valid", index)
    signals = valid.signals(histories)
    combination = Combination.fit(signals, exclude, targets, k)
    timings["validation stage (fit retriever, score, fit combination)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    test = stage_recommender(split, movies, "test", scorer, cfg, combination)
    _, histories, exclude, targets = _stage_data(split, "test", index)
    signals = test.signals(histories)
    timings["test stage (fit retriever, score every unseen item)"] = time.perf_counter() - t0
    cold_items = {i for i, n in enumerate(test.popularity) if n < cold_likes}
    cold_targets = [t & cold_items for t in targets]
    systems = [s for s in SYSTEMS if s != "lm" or scorer is not None]
    result = {"k": k, "cold_likes": cold_likes, "users": len(histories), "items": len(movies),
              "test_items": sum(map(len, targets)), "cold_test_items": sum(map(len, cold_targets)),
              "combination": {"features": combination.features, "weights": combination.weights,
                              "validation_ndcg": combination.validation_ndcg},
              "systems": {}, "cold": {}, "seconds": timings}
    for system in systems:
        top = top_k(test.system_scores(system, signals, exclude), exclude, k)
        result["systems"][system] = ranking_metrics(top, targets, len(movies))
        result["cold"][system] = ranking_metrics(top, cold_targets, len(movies))
    return result, combination


def chart_png(result: dict, path: Path) -> Path:
    """Grouped bars: Recall@k, NDCG@k, HR@k of each system, and Recall@k on the cold-start slice."""
    k = result["k"]
    metrics = [(f"recall@{k}", "systems"), (f"ndcg@{k}", "systems"), (f"hr@{k}", "systems"), (f"recall@{k}", "cold")]
    systems = list(result["systems"])
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        values = [result[part][system][m] for m, part in metrics]
        bars = ax.bar(np.arange(len(metrics)) + (j - (len(systems) - 1) / 2) * width, values, width,
                      label=LABELS[system])
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    ax.set_xticks(np.arange(len(metrics)),
                  [f"Recall@{k}", f"NDCG@{k}", f"HR@{k}", f"Recall@{k}\ncold-start items"])
    ax.set_title(f"MovieLens 100K, full ranking over unseen items, {result['users']} users")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _table(metrics: dict[str, dict], k: int) -> list[str]:
    rows = [f"| system | Recall@{k} | NDCG@{k} | HR@{k} | coverage | users |", "|---|---|---|---|---|---|"]
    for system, m in metrics.items():
        rows.append(f"| {LABELS[system]} | {m[f'recall@{k}']:.4f} | {m[f'ndcg@{k}']:.4f} | {m[f'hr@{k}']:.4f} | "
                    f"{m['coverage']:.3f} | {m['users']} |")
    return rows


def render_markdown(result: dict) -> str:
    """report.md from report.json's content."""
    k = result["k"]
    rows, cold = _table(result["systems"], k), _table(result["cold"], k)
    comb = result["combination"]
    weights = ", ".join(f"{n} {w:.1f}" for n, w in zip(comb["features"], comb["weights"], strict=True))
    lines = [f"# Evaluation of `{result.get('checkpoint', 'the recommender')}`", "",
             f"MovieLens 100K, temporal split per user; test stage: {result['users']} users, "
             f"{result['test_items']} liked test items, every unseen item of {result['items']} ranked "
             "(no sampled negatives).", "", *rows, "",
             f"## Cold-start slice: {result['cold_test_items']} test items with fewer than {result['cold_likes']} "
             "likes before the test period", "", "(the rest of each list still counts as ranked; users without "
             "such an item are left out)", "", *cold, "",
             f"Combination: weights {weights} on the per-user standardised signals, the grid point with the best "
             f"validation-stage NDCG@{k} ({comb['validation_ndcg']:.4f}).", "", "![metrics](metrics.png)"]
    if result.get("notes"):
        lines += ["", *result["notes"]]
    if result.get("seconds"):
        lines += ["", "| step | seconds |", "|---|---|",
                  *[f"| {name} | {s:.1f} |" for name, s in result["seconds"].items()]]
    return "\n".join(lines)


def write_report(result: dict, out: str | Path) -> Path:
    """report.json, report.md and metrics.png in OUT; returns report.md's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chart_png(result, out / "metrics.png")
    atomic_write_json(out / "report.json", result)
    atomic_write_bytes(out / "report.md", (render_markdown(result) + "\n").encode())
    return out / "report.md"
