import numpy as np
import pytest
from sklearn.metrics import ndcg_score

from palmkit.recommend.metrics import ranking_metrics, top_k


def test_top_k_leaves_out_seen_items_and_breaks_ties_by_index():
    scores = np.array([[0.1, 0.9, 0.9, 0.5, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    top = top_k(scores, [[1], [0, 1, 2, 3]], 3)
    assert top.tolist() == [[2, 3, 0], [4, -1, -1]]


def test_metrics_by_hand():
    top = np.array([[3, 1, 4], [0, 2, 5], [1, 2, 3]])
    targets = [{1, 9}, {7}, set()]  # the third user has no target: left out
    m = ranking_metrics(top, targets, n_items=10)
    assert m["users"] == 2
    assert m["recall@3"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["hr@3"] == pytest.approx(0.5)
    # user 1: one hit at rank 2 of an ideal two; user 2: none
    assert m["ndcg@3"] == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)) / 2)
    assert m["coverage"] == pytest.approx(len({3, 1, 4, 0, 2, 5}) / 10)


def test_ndcg_matches_scikit_learn():
    """Binary-gain NDCG@k against scikit-learn's, on random scores over a full catalogue."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 50))
    targets = [set(rng.choice(50, size=rng.integers(1, 15), replace=False).tolist()) for _ in range(20)]
    relevance = np.zeros((20, 50))
    for u, t in enumerate(targets):
        relevance[u, list(t)] = 1
    top = top_k(scores, [[] for _ in range(20)], 10)
    assert ranking_metrics(top, targets, 50)["ndcg@10"] == pytest.approx(ndcg_score(relevance, scores, k=10))


def test_no_user_with_targets_gives_nan():
    assert np.isnan(ranking_metrics(np.array([[0, 1]]), [set()], 5)["recall@2"])
