"""Top-k lists over the full catalogue and their scores: Recall@k, NDCG@k, HR@k and catalogue coverage.

Every item a user has not seen is ranked (no sampled negatives). Recall@k is hits / number of target items
(RecBole's definition); NDCG@k uses binary gains with the log2(rank + 1) discount and the ideal ranking of
min(k, targets) hits; HR@k is the share of users with at least one hit; coverage is the share of the catalogue
that appears in at least one user's list.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np


def top_k(scores: np.ndarray, exclude: Sequence[Collection[int]], k: int) -> np.ndarray:
    """(U, k) item indices, best first, of each row of `scores` leaving out the row's `exclude` items; ties go to
    the lower index. A user with fewer than k items left gets -1 in the empty places."""
    masked = np.array(scores, dtype=np.float64, copy=True)
    for u, items in enumerate(exclude):
        masked[u, list(items)] = -np.inf
    order = np.argsort(-masked, axis=1, kind="stable")[:, :k]
    taken = np.take_along_axis(masked, order, axis=1)
    return np.where(np.isneginf(taken), -1, order)


def ranking_metrics(top: np.ndarray, targets: Sequence[Collection[int]], n_items: int) -> dict[str, float]:
    """Mean Recall@k, NDCG@k and HR@k over users with at least one target, and coverage of their lists
    (k = top.shape[1])."""
    k = top.shape[1]
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    recall, ndcg, hit, shown = [], [], [], set()
    for row, wanted in zip(top, targets, strict=True):
        if not wanted:
            continue
        wanted = set(wanted)
        hits = np.array([i in wanted for i in row], dtype=np.float64)
        recall.append(hits.sum() / len(wanted))
        ndcg.append((hits * discount).sum() / discount[: min(k, len(wanted))].sum())
        hit.append(float(hits.any()))
        shown.update(int(i) for i in row if i >= 0)
    if not recall:
        return {"users": 0, f"recall@{k}": float("nan"), f"ndcg@{k}": float("nan"), f"hr@{k}": float("nan"),
                "coverage": float("nan")}
    return {"users": len(recall), f"recall@{k}": float(np.mean(recall)), f"ndcg@{k}": float(np.mean(ndcg)),
            f"hr@{k}": float(np.mean(hit)), "coverage": len(shown) / n_items}
