import numpy as np
import pytest

from palmkit.errors import PalmkitError
from palmkit.recommend.recommender import Recommendation, load_recommender


@pytest.fixture(scope="module")
def rec(recommender_dir):
    return load_recommender(recommender_dir[0] / "model")


def test_a_known_user_gets_unseen_items_with_their_reasons(rec):
    result = rec.recommend("2", k=5)
    assert result.personalised and len(result.items) == 5 and not result.notice
    assert not {it["item"] for it in result.items} & rec.rated["2"]
    names = {rec.movies[rec.index[i]].name for i in rec.likes["2"]}
    assert result.history == [rec.movies[rec.index[i]].name for i in rec.likes["2"]]
    assert all(it["because"] and set(it["because"]) <= names for it in result.items)
    scores = [it["score"] for it in result.items]
    assert scores == sorted(scores, reverse=True)


def test_the_list_follows_the_combined_signals(rec):
    history = [rec.index[i] for i in rec.likes["2"]]
    hidden = sorted(rec.index[i] for i in rec.rated["2"])
    combined = rec.system_scores("combination", rec.signals([history]), [hidden])[0]
    combined[hidden] = -np.inf
    expected = [rec.movies[i].item for i in np.argsort(-combined, kind="stable")[:5]]
    assert [it["item"] for it in rec.recommend("2", k=5).items] == expected


def test_each_system_ranks_on_its_own(rec):
    pop = rec.recommend("2", k=3, system="popularity")
    counts = rec.popularity.copy()
    counts[[rec.index[i] for i in rec.rated["2"]]] = -1
    assert [it["item"] for it in pop.items] == [rec.movies[i].item for i in np.argsort(-counts, kind="stable")[:3]]
    with pytest.raises(PalmkitError, match="unknown system"):
        rec.recommend("2", system="magic")


def test_unknown_user_and_user_without_likes_get_labelled_popularity(rec):
    unknown = rec.recommend("999", k=3)
    assert not unknown.personalised and "unknown user '999'" in unknown.notice
    assert [it["item"] for it in unknown.items] == [it["item"] for it in rec.popular(3)]
    quiet = rec.recommend("24", k=3)  # the fixture's last user rated everything 2 stars
    assert not quiet.personalised and "user 24 has liked nothing yet" in quiet.notice
    assert not {it["item"] for it in quiet.items} & rec.rated["24"]
    assert "most popular (not personalised):" in quiet.text()
    top = quiet.items[0]
    assert f"  1. {int(top['score']):>4} likes  {top['title']}" in quiet.text()


def test_a_history_of_item_ids_is_checked(rec):
    assert rec.recommend_for(["1", "3"], k=2).personalised
    with pytest.raises(PalmkitError, match="unknown item id"):
        rec.recommend_for(["1", "nope"])
    with pytest.raises(PalmkitError, match="k must be"):
        rec.recommend_for(["1"], k=0)


def test_text_shows_rank_score_title_and_source():
    r = Recommendation("7", True, [{"item": "1", "title": "A (1990)", "score": 1.5, "because": ["B (1991)"]}],
                       ["B (1991)"])
    assert r.text().splitlines() == ["user 7 liked: B (1991)", "recommended:", "  1.   1.500  A (1990)  <- B (1991)"]


def test_a_folder_without_recommender_files_is_refused(checkpoint):
    with pytest.raises(PalmkitError, match="not a recommender folder"):
        load_recommender(checkpoint)
