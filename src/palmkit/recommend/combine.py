"""The final ranking: the language model's score, the retriever's and popularity, in a learned combination.

Each signal is standardised per user over the items that user's ranking covers (mean 0, variance 1 among the
unseen items), which keeps each signal's order and puts the signals on one scale. The weights are then learned
on the validation stage by the measure the ranking is judged by: of the weight vectors on a grid over the
simplex (steps of 0.1: 66 vectors for three signals), the one whose lists have the best NDCG@k on the
validation items. A pointwise logistic regression was tried first: it fits liked-versus-random items, which
popularity separates best, and weighted popularity over the retriever, a worse ranking of the top of the list.
The test stage is never used to fit the weights.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np

from palmkit.errors import PalmkitError
from palmkit.recommend.metrics import ranking_metrics, top_k


def standardise(scores: np.ndarray, exclude: Sequence[Collection[int]]) -> np.ndarray:
    """Each row centred and scaled over its items outside `exclude` (a constant row becomes zeros)."""
    keep = np.ones(scores.shape, dtype=bool)
    for u, items in enumerate(exclude):
        keep[u, list(items)] = False
    count = np.maximum(keep.sum(1, keepdims=True), 1)
    mean = np.where(keep, scores, 0.0).sum(1, keepdims=True) / count
    var = np.where(keep, (scores - mean) ** 2, 0.0).sum(1, keepdims=True) / count
    return (scores - mean) / np.where(var > 0, np.sqrt(var), 1.0)


def simplex_grid(n: int, step: float) -> list[tuple[float, ...]]:
    """Every weight vector of n non-negative multiples of `step` that sum to 1."""
    parts = round(1 / step)
    return [tuple(c / parts for c in combo) for combo in itertools.product(range(parts + 1), repeat=n)
            if sum(combo) == parts]


@dataclass
class Combination:
    """score = Σ weight_f · standardised signal f."""

    features: tuple[str, ...]
    weights: tuple[float, ...]
    validation_ndcg: float = float("nan")  # NDCG@k of the chosen weights on the data they were fitted on

    @classmethod
    def fit(cls, signals: dict[str, np.ndarray], exclude: Sequence[Collection[int]],
            targets: Sequence[Collection[int]], k: int = 10, step: float = 0.1) -> Combination:
        """The grid weights whose lists (each (U, I) signal standardised per user, `exclude` left out) have the
        best NDCG@k on `targets`; ties go to the first on the grid."""
        if not any(targets):
            raise PalmkitError("the validation stage has no liked items to fit the combination on")
        names = tuple(signals)
        z = [standardise(signals[n], exclude) for n in names]
        best: tuple[float, tuple[float, ...]] | None = None
        for weights in simplex_grid(len(names), step):
            scores = sum(w * s for w, s in zip(weights, z, strict=True))
            ndcg = ranking_metrics(top_k(scores, exclude, k), targets, scores.shape[1])[f"ndcg@{k}"]
            if best is None or ndcg > best[0]:
                best = (ndcg, weights)
        return cls(names, best[1], best[0])

    def scores(self, signals: dict[str, np.ndarray], exclude: Sequence[Collection[int]]) -> np.ndarray:
        """(U, I) combined scores of the signals (standardised as in `fit`)."""
        missing = set(self.features) - set(signals)
        if missing:
            raise PalmkitError(f"the combination needs the signal(s) {', '.join(sorted(missing))}")
        return sum(w * standardise(signals[n], exclude) for n, w in zip(self.features, self.weights, strict=True))
