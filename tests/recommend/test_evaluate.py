import copy

import numpy as np
import pytest

from palmkit.data.recommend import load_movielens, temporal_split
from palmkit.recommend.evaluate import evaluate_split, like_counts, render_markdown, write_report
from palmkit.recommend.retriever import RetrieverConfig
from tests.conftest import movielens_files


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    ratings, movies = load_movielens(movielens_files(tmp_path_factory.mktemp("ml")))
    split = temporal_split(ratings, list(movies))
    return split, [movies[i] for i in split.items]


def test_without_a_language_model_three_systems_are_ranked(data, tmp_path):
    split, movies = data
    result, combination = evaluate_split(split, movies, None, RetrieverConfig(factors=4), k=5)
    assert list(result["systems"]) == ["popularity", "retriever", "combination"]
    assert result["users"] == len(split.targets("test"))
    assert result["systems"]["retriever"]["ndcg@5"] > result["systems"]["popularity"]["ndcg@5"]
    assert set(combination.features) == {"retriever", "popularity"}
    report = write_report(result, tmp_path)
    assert report.read_text() == render_markdown(result) + "\n" and (tmp_path / "metrics.png").is_file()
    assert "| retriever (ALS) |" in report.read_text()


def test_the_combination_never_sees_the_test_items(data):
    split, movies = data
    _, fitted = evaluate_split(split, movies, None, RetrieverConfig(factors=4), k=5)
    shuffled = copy.deepcopy(split)
    rng = np.random.default_rng(0)
    for user, items in shuffled.test.items():
        shuffled.test[user] = [str(i) for i in rng.choice(np.arange(1, 31), len(items), replace=False)]
    _, again = evaluate_split(shuffled, movies, None, RetrieverConfig(factors=4), k=5)
    assert again.weights == pytest.approx(fitted.weights)


def test_the_cold_slice_holds_the_test_items_with_few_likes(data):
    split, movies = data
    index = {m.item: i for i, m in enumerate(movies)}
    result, _ = evaluate_split(split, movies, None, RetrieverConfig(factors=4), k=5, cold_likes=3)
    counts = like_counts({u: [index[i] for i in h] for u, h in split.histories("test").items()}, len(movies))
    cold = sum(counts[index[i]] < 3 for items in split.targets("test").values() for i in items)
    assert result["cold_test_items"] == cold
