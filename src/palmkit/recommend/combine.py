"""The final ranking: the language model's score, the retriever's and popularity, in a learned combination.

Each signal is standardised per user over the items that user's ranking covers (mean 0, variance 1 among the
unseen items), which keeps each signal's order and puts the three on one scale; a logistic regression on the
validation stage (its liked items against a sample of the rest) then learns one weight per signal. The test
stage is never used to fit it.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.linear_model import LogisticRegression

from palmkit.errors import PalmkitError


def standardise(scores: np.ndarray, exclude: Sequence[Collection[int]]) -> np.ndarray:
    """Each row centred and scaled over its items outside `exclude` (a constant row becomes zeros)."""
    keep = np.ones(scores.shape, dtype=bool)
    for u, items in enumerate(exclude):
        keep[u, list(items)] = False
    count = np.maximum(keep.sum(1, keepdims=True), 1)
    mean = np.where(keep, scores, 0.0).sum(1, keepdims=True) / count
    var = np.where(keep, (scores - mean) ** 2, 0.0).sum(1, keepdims=True) / count
    return (scores - mean) / np.where(var > 0, np.sqrt(var), 1.0)


@dataclass
class Combination:
    """score = Σ weight_f · standardised signal f (+ bias, which does not change a ranking)."""

    features: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float = 0.0

    @classmethod
    def fit(cls, signals: dict[str, np.ndarray], exclude: Sequence[Collection[int]],
            targets: Sequence[Collection[int]], negatives: int = 300, seed: int = 0, c: float = 1.0) -> Combination:
        """Logistic regression of liked (targets) vs `negatives` sampled unseen items per user, on the signals
        (each (U, I)) standardised per user."""
        names = tuple(signals)
        z = [standardise(signals[n], exclude) for n in names]
        rng = random.Random(seed)
        rows, labels = [], []
        n_items = z[0].shape[1]
        for u, wanted in enumerate(targets):
            if not wanted:
                continue
            hidden = set(exclude[u]) | set(wanted)
            pool = [i for i in range(n_items) if i not in hidden]
            for items, label in ((sorted(wanted), 1), (rng.sample(pool, min(negatives, len(pool))), 0)):
                rows += [(u, i) for i in items]
                labels += [label] * len(items)
        if len(set(labels)) < 2:
            raise PalmkitError("the validation stage has no liked items to fit the combination on")
        users, items = np.array(rows).T
        x = np.stack([s[users, items] for s in z], axis=1)
        model = LogisticRegression(C=c, max_iter=1000).fit(x, np.array(labels))
        return cls(names, tuple(float(w) for w in model.coef_[0]), float(model.intercept_[0]))

    def scores(self, signals: dict[str, np.ndarray], exclude: Sequence[Collection[int]]) -> np.ndarray:
        """(U, I) combined scores of the signals (standardised as in `fit`)."""
        missing = set(self.features) - set(signals)
        if missing:
            raise PalmkitError(f"the combination needs the signal(s) {', '.join(sorted(missing))}")
        return sum(w * standardise(signals[n], exclude) for n, w in zip(self.features, self.weights, strict=True)
                   ) + self.bias
