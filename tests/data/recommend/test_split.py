import pytest

from palmkit.data.recommend import Rating, implicit_feedback, load_movielens, temporal_split
from palmkit.errors import PalmkitError
from tests.conftest import movielens_files


def ratings(user: str, stars: list[int]) -> list[Rating]:
    """One rating per item i0, i1, ... at times 10, 20, ... (so item order is time order)."""
    return [Rating(user, f"i{n}", s, 10 * (n + 1)) for n, s in enumerate(stars)]


ITEMS = [f"i{n}" for n in range(20)]


def test_implicit_feedback_keeps_four_and_five_stars():
    assert [r.rating for r in implicit_feedback(ratings("u", [1, 4, 3, 5, 2]))] == [4, 5]


def test_the_last_likes_are_test_the_ones_before_validation():
    stars = [5, 1, 4, 4, 2, 5, 4, 4, 5, 3, 4, 5]  # nine likes: 2 test, 1 validation, 6 training
    split = temporal_split(ratings("u", stars), ITEMS)
    likes = [f"i{n}" for n, s in enumerate(stars) if s >= 4]
    assert split.test["u"] == likes[-2:] and split.valid["u"] == likes[-3:-2] and split.train["u"] == likes[:-3]
    assert split.history("u", "test") == likes[:-2] and split.history("u", "all") == likes
    # seen at the test stage: everything rated before the first test like, liked or not
    first_test = int(split.test["u"][0][1:])
    assert split.seen["test"]["u"] == {f"i{n}" for n in range(first_test)}
    assert split.seen["valid"]["u"] == {f"i{n}" for n in range(int(split.valid["u"][0][1:]))}


def test_no_future_item_leaks_into_a_history(tmp_path):
    rows, _ = load_movielens(movielens_files(tmp_path))
    split = temporal_split(rows, [str(i) for i in range(1, 31)])
    when = {(r.user, r.item): r.time for r in rows}
    for user, targets in split.targets("test").items():
        start = min(when[user, i] for i in targets)
        assert all(when[user, i] <= start for i in split.history(user, "test"))
        assert all(when[user, i] < start for i in split.seen["test"][user])
        assert not set(targets) & split.seen["test"][user]


def test_ties_in_time_keep_file_order_and_few_likes_stay_history():
    tied = [Rating("u", f"i{n}", 5, 100) for n in range(10)]
    split = temporal_split(tied, ITEMS)
    assert split.test["u"] == ["i8", "i9"]
    few = temporal_split(ratings("v", [5, 5, 1]), ITEMS)
    assert few.train["v"] == ["i0", "i1"] and not few.targets("test") and few.seen["test"]["v"] == {"i0", "i1", "i2"}


def test_a_user_without_likes_has_an_empty_history():
    split = temporal_split(ratings("w", [1, 2, 3]), ITEMS)
    assert split.history("w", "all") == [] and split.rated["w"] == {"i0", "i1", "i2"}


def test_bad_shares_and_unknown_items_are_refused():
    with pytest.raises(PalmkitError, match="test_share"):
        temporal_split([], ITEMS, test_share=0.6, valid_share=0.5)
    with pytest.raises(PalmkitError, match="rating 1: item zz is not in the catalogue"):
        temporal_split([Rating("u", "zz", 5, 1)], ITEMS)
