import pytest
import torch

from palmkit.data.recommend import Movie
from palmkit.finetune.encode import collate
from palmkit.recommend.scorer import PairEncoder, ScorerConfig, TextScorer, TwoTower, load_scorer, training_pairs
from tests.conftest import random_model

MOVIES = [Movie(str(i), f"Film number {i}", str(1990 + i), ("Drama",) if i % 2 else ("Comedy", "Horror"))
          for i in range(12)]


@pytest.fixture
def encoder(tokenizer):
    return PairEncoder(tokenizer, MOVIES, ScorerConfig(dim=8, item_len=12, history_len=20))


def test_a_history_is_the_latest_titles_that_fit_oldest_first(encoder, tokenizer):
    ids = encoder.history([0, 1, 2, 3, 4, 5])
    assert ids[-1] == tokenizer.eos_id and len(ids) <= 20
    kept = tokenizer.decode(ids[:-1])
    titles = [m.name for m in MOVIES[:6] if m.name in kept]
    assert titles == [m.name for m in MOVIES[6 - len(titles):6]] and titles  # a suffix of the history, in order
    assert encoder.history([]) == [tokenizer.eos_id]


def test_pairs_score_like_the_two_towers_apart(encoder, tokenizer):
    """The packed (history, candidate) forward equals encoding each text alone and taking the dot product."""
    torch.manual_seed(0)
    module = TwoTower(random_model(tokenizer.vocab_size), tokenizer.eos_id, dim=8, dropout=0.0).eval()
    with torch.no_grad():
        module.head.bias.fill_(0.25)
    histories, items = [[0, 1, 2], [5], [], [3, 4, 6, 7, 8, 9]], [4, 11, 2, 0]
    ids, lengths, _ = collate([encoder.pair(h, i, True) for h, i in zip(histories, items, strict=True)],
                              tokenizer.pad_id)
    with torch.no_grad():
        packed = module(ids, lengths)[:, 0]
        scorer = TextScorer(module, encoder)
        full = torch.from_numpy(scorer.scores(histories))
    apart = full[torch.arange(4), torch.tensor(items)]
    torch.testing.assert_close(packed, apart, atol=1e-4, rtol=1e-4)
    # and the hand formula: u·v / sqrt(dim) + bias
    u, v = scorer.user_vectors(histories[:1])[0], scorer.item_vectors()[items[0]]
    assert float(packed[0]) == pytest.approx(float(u @ v) / 8 ** 0.5 + 0.25, abs=1e-4)


def test_training_pairs_use_only_earlier_likes_and_never_rated_negatives():
    histories = [[0, 1, 2, 3], [4, 5], [6]]
    rated = [{0, 1, 2, 3, 7}, {4, 5, 8}, {6}]
    pairs = training_pairs(histories, rated, 12, max_pairs=0, negatives=2, seed=0)
    positives = [(h, i) for h, i, liked in pairs if liked]
    assert sorted(positives) == sorted([([0], 1), ([0, 1], 2), ([0, 1, 2], 3), ([4], 5)])
    owner = {0: 0, 1: 0, 2: 0, 3: 0, 4: 1, 5: 1}
    for history, item, liked in pairs:
        if not liked:
            assert item not in rated[owner[history[0]]]
    assert sum(not liked for *_, liked in pairs) == 2 * len(positives)
    assert len(training_pairs(histories, rated, 12, max_pairs=6, negatives=2, seed=0)) == 6


def test_a_saved_scorer_loads_and_scores_the_same(recommender_dir):
    """The scorer in a recipe folder scores as the module it was tuned as (head weights included)."""
    from palmkit.recommend.recommender import load_recommender

    folder = recommender_dir[0] / "model"
    rec = load_recommender(folder)
    fresh = load_scorer(folder, rec.movies)  # no cached item vectors: encodes the catalogue again
    histories = [[0, 3, 5], [7]]
    torch.testing.assert_close(torch.from_numpy(fresh.scores(histories)),
                               torch.from_numpy(rec.scorer.scores(histories)), atol=1e-4, rtol=1e-4)


def test_lora_tuning_writes_a_loadable_scorer(checkpoint, tmp_path):
    """LoRA adapters (merged on save) through the same fit loop; the folder loads as a scorer."""
    from palmkit.data.recommend import load_movielens, temporal_split
    from palmkit.finetune.fit import FinetuneConfig
    from palmkit.recommend.scorer import finetune_scorer
    from tests.conftest import movielens_files

    ratings, movies = load_movielens(movielens_files(tmp_path))
    split = temporal_split(ratings, list(movies))
    best = finetune_scorer(str(checkpoint), str(tmp_path / "lora"), split, movies,
                           FinetuneConfig(max_train=16, max_valid=16, batch_size=8, lora_rank=2, max_len=40),
                           ScorerConfig(dim=4, item_len=12, history_len=24))
    assert 0 <= best["valid/auc"] <= 1 and best["trainable_params"] < 10_000  # of 552k: adapters and heads only
    scorer = load_scorer(tmp_path / "lora", [movies[i] for i in split.items])
    assert scorer.scores([[0, 1]]).shape == (1, 30)
