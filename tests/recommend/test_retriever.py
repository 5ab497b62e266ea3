import numpy as np
import pytest
from implicit.als import AlternatingLeastSquares

from palmkit.recommend.retriever import Retriever, RetrieverConfig, like_matrix

# two tastes: items 0-3 and items 4-7, each user likes three of one group
HISTORIES = [[0, 1, 2], [1, 2, 3], [0, 2, 3], [0, 1, 3], [4, 5, 6], [5, 6, 7], [4, 6, 7], [4, 5, 7]]


def test_like_matrix_counts_a_repeated_item_once():
    m = like_matrix([[0, 0, 2], []], 3).toarray()
    assert m.tolist() == [[1, 0, 1], [0, 0, 0]]


@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_user_factors_match_implicits_own_recalculation(alpha):
    """The closed form here and implicit's `recalculate_user` solve the same least-squares step."""
    cfg = RetrieverConfig(factors=4, alpha=alpha, regularization=0.1, iterations=5)
    likes = like_matrix(HISTORIES, 8)
    model = AlternatingLeastSquares(factors=4, alpha=alpha, regularization=0.1, iterations=5, random_state=0,
                                    use_gpu=False)
    model.fit(likes, show_progress=False)
    retriever = Retriever(model.item_factors, cfg.regularization, cfg.alpha)
    history = [0, 2, 5]
    expected = model.recalculate_user(0, like_matrix([history], 8))
    np.testing.assert_allclose(retriever.user_factors([history])[0], expected, rtol=1e-3, atol=1e-5)


def test_scores_follow_the_taste_of_the_history():
    retriever = Retriever.fit(HISTORIES, 8, RetrieverConfig(factors=2, iterations=15))
    scores = retriever.scores([[0, 1], [5, 6], []])
    assert scores[0, [2, 3]].min() > scores[0, 4:].max()  # each history's own group comes first
    assert scores[1, [4, 7]].min() > scores[1, :4].max()
    assert not scores[2].any()  # an empty history scores nothing


def test_candidates_are_the_best_unseen_items():
    retriever = Retriever.fit(HISTORIES, 8, RetrieverConfig(factors=2, iterations=15))
    top = retriever.candidates([[0, 1], [5, 6]], n=2)
    assert set(top[0]) == {2, 3} and set(top[1]) == {4, 7}
    assert sorted(retriever.candidates([[1]], n=7)[0]) == [0, 2, 3, 4, 5, 6, 7]  # the history is left out
    assert 1 in retriever.candidates([[1]], n=8, exclude=[[]])[0]


def test_contributions_add_up_to_the_score():
    retriever = Retriever.fit(HISTORIES, 8, RetrieverConfig(factors=2, iterations=15))
    history = [0, 1, 5]
    shares = retriever.contributions(history, 2)
    assert set(shares) == set(history)
    assert sum(shares.values()) == pytest.approx(retriever.scores([history])[0, 2], rel=1e-6)
    assert max(shares, key=shares.get) in (0, 1)  # item 2 is liked with 0 and 1, not with 5
    assert retriever.contributions([], 2) == {}


def test_no_likes_is_an_error():
    from palmkit.errors import PalmkitError

    with pytest.raises(PalmkitError, match="no likes"):
        Retriever.fit([[], []], 3)
