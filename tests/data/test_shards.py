"""Token shards and the mixture loader: each document once, exact windows, mixing proportions, resumes, rank shards."""

import json

import numpy as np
import pytest

from palmkit.data.corpus.build import shard_text
from palmkit.data.shards import MixtureLoader, TokenStream, mixture_weights, validation_batches
from palmkit.errors import PalmkitError


def test_shards_hold_every_document_once_between_bos_and_eod(corpus, tokenizer):
    from palmkit.model.tokenizer import Tokenizer

    tok = Tokenizer(corpus / "tokenizer.model")
    for lang in ("en", "de", "zh"):
        docs = [json.loads(line)["text"] for line in open(corpus / "text" / lang / "train.jsonl", encoding="utf-8")]
        # a document starts as every prompt does (the BOS rule), and EOS ends it
        expected = [t for d in docs for t in [*tok.encode_prompt(d), tok.eos_id]]
        assert expected[0] == tok.bos_id
        stream = TokenStream(corpus / "shards" / lang, "train", seq_len=16)
        assert np.asarray(stream.tokens).tolist() == expected
        index = json.loads((corpus / "shards" / lang / "index.json").read_text())
        assert index["train"]["documents"] == len(docs) and index["dtype"] == "uint16"
        assert index["bos_id"] == tok.bos_id


def test_windows_cover_each_token_exactly_once_per_epoch(corpus):
    stream = TokenStream(corpus / "shards" / "de", "train", seq_len=24)
    n = len(stream.tokens)
    owned = np.concatenate([stream.sequence(i)[:-1] for i in range(stream.n_sequences)])
    # The windows' first T tokens tile the stream (the last one wraps to the start: no padding).
    assert owned[:n].tolist() == np.asarray(stream.tokens).tolist()
    assert len(owned) - n < 24
    seq = stream.sequence(0)
    assert len(seq) == 25 and seq[1:].tolist() == np.asarray(stream.tokens[1:25]).tolist()


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mixing_proportions(corpus, alpha):
    loader = MixtureLoader(corpus, seq_len=16, batch_size=64, alpha=alpha, seed=1)
    sizes = {lang: len(s.tokens) for lang, s in loader.streams.items()}
    expected = {lang: n**alpha / sum(m**alpha for m in sizes.values()) for lang, n in sizes.items()}
    assert mixture_weights(sizes, alpha) == pytest.approx(expected)
    counts = dict.fromkeys(sizes, 0)
    draws = 0
    for _ in range(60):
        for lang, _w in loader.draw():
            counts[lang] += 1
            draws += 1
    for lang, p in expected.items():
        sd = (p * (1 - p) / draws) ** 0.5
        assert abs(counts[lang] / draws - p) < 4 * sd + 1e-9
    if alpha == 0.0:
        assert max(expected.values()) == pytest.approx(min(expected.values()))


def test_an_empty_language_gets_no_share_at_any_alpha():
    for alpha in (0.0, 0.3, 1.0):
        w = mixture_weights({"big": 900, "small": 100, "none": 0}, alpha)
        assert w["none"] == 0.0
        assert w["small"] == pytest.approx(100**alpha / (900**alpha + 100**alpha))
    assert mixture_weights({"none": 0}, 0.3) == {"none": 0.0}


def test_loader_is_deterministic_and_resumes_exactly(corpus):
    a = MixtureLoader(corpus, seq_len=16, batch_size=8, seed=3)
    for _ in range(7):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # it must survive JSON
    expected = [a.next_batch()[0] for _ in range(20)]  # long enough to roll over epochs
    b = MixtureLoader(corpus, seq_len=16, batch_size=8, seed=3)
    b.load_state_dict(state)
    for e in expected:
        assert b.next_batch()[0].equal(e)
    c = MixtureLoader(corpus, seq_len=16, batch_size=8, seed=4)
    assert not c.next_batch()[0].equal(MixtureLoader(corpus, seq_len=16, batch_size=8, seed=3).next_batch()[0])


def test_rank_shards_are_disjoint_and_cover_the_global_batch(corpus):
    single = MixtureLoader(corpus, seq_len=16, batch_size=8, seed=5)
    ranks = [MixtureLoader(corpus, seq_len=16, batch_size=8, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        glob = single.next_batch()[0]
        parts = [r.next_batch()[0] for r in ranks]
        assert parts[0].equal(glob[0::2]) and parts[1].equal(glob[1::2])


def test_validation_batches_pad_ranks_evenly(corpus):
    batches0, n, bpt = validation_batches(corpus, "en", 16, 4, rank=0, world_size=2)
    batches1, _, _ = validation_batches(corpus, "en", 16, 4, rank=1, world_size=2)
    b0, b1 = list(batches0), list(batches1)
    assert len(b0) == len(b1) and bpt > 0
    scored = sum(int((t != -100).any(dim=1).sum()) for _, t in b0 + b1)
    assert scored == n


def test_errors_are_clear(tmp_path, corpus):
    with pytest.raises(PalmkitError, match="no token shards"):
        MixtureLoader(tmp_path, 16, 4)
    with pytest.raises(PalmkitError, match="no shards for language"):
        MixtureLoader(corpus, 16, 4, langs=["xx"])
    with pytest.raises(PalmkitError, match="build the corpus first"):
        shard_text(tmp_path)


def test_unigram_perplexity_matches_hand_computation(corpus):
    from palmkit.data.shards import unigram_perplexity

    train = np.asarray(TokenStream(corpus / "shards" / "zh", "train", 8).tokens)
    valid = np.asarray(TokenStream(corpus / "shards" / "zh", "valid", 8).tokens)
    vocab = json.loads((corpus / "shards" / "zh" / "index.json").read_text())["vocab_size"]
    counts = {t: 1.0 for t in range(vocab)}
    for t in train.tolist():
        counts[t] += 1
    total = sum(counts.values())
    import math

    expected = math.exp(-sum(math.log(counts[t] / total) for t in valid.tolist()) / len(valid))
    assert unigram_perplexity(corpus, "zh") == pytest.approx(expected, rel=1e-9)


def test_shards_without_bos_are_warned_about(corpus, tmp_path):
    import shutil

    old = tmp_path / "old"
    shutil.copytree(corpus / "shards", old / "shards")
    index_file = old / "shards" / "en" / "index.json"
    index = json.loads(index_file.read_text())
    del index["bos_id"]  # as an older palmkit wrote it, documents without BOS
    index_file.write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="shards of en under .* have no BOS"):
        MixtureLoader(old, seq_len=16, batch_size=2)
