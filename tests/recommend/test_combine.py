import numpy as np
import pytest

from palmkit.errors import PalmkitError
from palmkit.recommend.combine import Combination, simplex_grid, standardise
from palmkit.recommend.metrics import ranking_metrics, top_k


def test_standardise_uses_only_the_ranked_items():
    scores = np.array([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 5.0, 5.0]])
    z = standardise(scores, [[3], []])
    np.testing.assert_allclose(z[0, :3], (np.array([1, 2, 3]) - 2) / np.std([1, 2, 3]))
    assert not z[1].any()  # a constant row carries no order


def test_the_combination_learns_which_signal_carries_the_likes():
    rng = np.random.default_rng(0)
    users, items = 40, 60
    targets = [set(rng.choice(items, 3, replace=False).tolist()) for _ in range(users)]
    useful = rng.normal(size=(users, items))
    for u, t in enumerate(targets):
        useful[u, list(t)] += 3.0  # the liked items stand out in this signal only
    noise = rng.normal(size=(users, items))
    exclude = [[] for _ in range(users)]
    comb = Combination.fit({"useful": useful, "noise": noise}, exclude, targets, k=5)
    weights = dict(zip(comb.features, comb.weights, strict=True))
    assert weights["useful"] >= 0.8 and sum(comb.weights) == pytest.approx(1.0)
    combined = comb.scores({"useful": useful, "noise": noise}, exclude)
    np.testing.assert_allclose(combined, weights["useful"] * standardise(useful, exclude)
                               + weights["noise"] * standardise(noise, exclude))
    # the chosen weights rank the fitting data as well as any other grid point: the useful signal alone, say
    alone = ranking_metrics(top_k(standardise(useful, exclude), exclude, 5), targets, items)["ndcg@5"]
    assert comb.validation_ndcg >= alone
    with pytest.raises(PalmkitError, match="needs the signal"):
        comb.scores({"useful": useful}, exclude)


def test_the_grid_covers_the_simplex():
    grid = simplex_grid(3, 0.1)
    assert len(grid) == 66 and all(sum(w) == pytest.approx(1.0) and min(w) >= 0 for w in grid)
    assert (1.0, 0.0, 0.0) in grid and (0.0, 0.5, 0.5) in grid


def test_no_targets_cannot_be_fitted():
    with pytest.raises(PalmkitError, match="no liked items"):
        Combination.fit({"a": np.zeros((2, 5))}, [[], []], [set(), set()])
