import numpy as np
import pytest

from palmkit.errors import PalmkitError
from palmkit.recommend.combine import Combination, standardise


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
    comb = Combination.fit({"useful": useful, "noise": noise}, exclude, targets, negatives=30)
    weights = dict(zip(comb.features, comb.weights, strict=True))
    assert weights["useful"] > 1.0 and abs(weights["noise"]) < 0.5 * weights["useful"]
    combined = comb.scores({"useful": useful, "noise": noise}, exclude)
    np.testing.assert_allclose(combined, weights["useful"] * standardise(useful, exclude)
                               + weights["noise"] * standardise(noise, exclude) + comb.bias)
    with pytest.raises(PalmkitError, match="needs the signal"):
        comb.scores({"useful": useful}, exclude)


def test_no_targets_cannot_be_fitted():
    with pytest.raises(PalmkitError, match="no liked items"):
        Combination.fit({"a": np.zeros((2, 5))}, [[], []], [set(), set()])
