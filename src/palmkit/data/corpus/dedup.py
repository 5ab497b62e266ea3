"""Exact and near-duplicate removal (MinHash + LSH over character 5-grams) and hash-based splits.

A document is dropped as an exact duplicate when its normalised text was seen before, as a near duplicate when it
shares an LSH band with a kept document before it and their Jaccard similarity is at least NEAR_DUP (estimated by
MinHash, computed exactly where the estimate is too close to call); the first of each group is kept.

The work comes in steps that need no order among documents until the last, so that it spreads over workers and
machines (`palmkit.data.corpus.stages`): `exact_duplicates` on the exact keys and `candidate_pairs` on the LSH
band keys, each for any partition of the keys by hash (a key's documents are all in one partition); `verify`,
the exact checks of the pairs, for any range of later documents; then `settle`, which walks the pairs once in
document order and applies the "first kept" rule. The decisions do not depend on how the work was cut.
`deduplicate` runs them on a list in memory.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence

import numpy as np

SHINGLE, BINS, NEAR_DUP = 5, 64, 0.8


UNSURE = 0.15  # three standard deviations of the estimate at NEAR_DUP: closer estimates are checked exactly

# LSH bands of BINS // BANDS values: two texts of Jaccard similarity J share a band with probability
# 1 - (1 - J ** 4) ** 16, 0.9998 at the 0.8 threshold (8 bands of 8 values found only 77% of such pairs); pairs
# well below it (J = 0.3: 12%) only cost a similarity check.
BANDS = 16


BUCKET = 16  # documents of one LSH band key a document is paired with: the first and the last half before it


_EMPTY = np.uint64(2**64 - 1)


_NON_WORD = re.compile(r"[\W_]+")


def normalise(text: str) -> str:
    """Lower case with punctuation and spacing differences removed (the key for exact deduplication)."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def _mix64(h: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: spreads polynomial hashes over all 64 bits."""
    h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


def _shingles(text: str) -> np.ndarray:
    """A polynomial hash of each run of SHINGLE characters of `text`, in order (not yet mixed)."""
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = max(0, len(codes) - SHINGLE + 1)
    h = np.zeros(n, dtype=np.uint64)
    for j in range(SHINGLE):
        h = h * np.uint64(1_000_003) + codes[j:j + n]
    return h


def jaccard(a: str, b: str) -> float:
    """The exact Jaccard similarity of two normalised texts' sets of character 5-grams (64-bit hashes of them)."""
    x, y = _distinct(_shingles(a)), _distinct(_shingles(b))
    if not len(x) or not len(y):
        return 0.0
    both = int(np.count_nonzero(x[np.minimum(np.searchsorted(x, y), len(x) - 1)] == y))
    return both / (len(x) + len(y) - both)


def _distinct(h: np.ndarray) -> np.ndarray:
    """The sorted distinct values of `h` (np.unique costs more on the short arrays of one text)."""
    h = np.sort(h)
    return h[np.concatenate(([True], h[1:] != h[:-1]))] if len(h) else h


def minhash(norm: str) -> np.ndarray | None:
    """64 MinHash values of a normalised text's character 5-grams, one hash split into 64 bins
    (one-permutation hashing, Li et al. 2012); None for texts too short to have shingles."""
    sig = minhash_many([norm])[0]
    return None if (sig == _EMPTY).all() else sig


def minhash_many(norms: Sequence[str], chunk_chars: int = 4_000_000) -> np.ndarray:
    """`minhash` of many texts, (len(norms), 64): whole chunks of texts are hashed by a few numpy operations,
    since per-document calls cost more than the hashing itself. Rows of texts without shingles stay empty."""
    sigs = np.full((len(norms), BINS), _EMPTY, dtype=np.uint64)
    start = 0
    while start < len(norms):
        end, size = start, 0
        while end < len(norms) and (size < chunk_chars or end == start):
            size += len(norms[end])
            end += 1
        lengths = np.array([len(x) for x in norms[start:end]], dtype=np.int64)
        h = _shingles("".join(norms[start:end]))
        n = len(h)
        if n > 0:
            doc = np.repeat(np.arange(start, end), lengths)[:n]
            ends = np.cumsum(lengths)
            inside = np.arange(n) + SHINGLE <= ends[doc - start]  # shingles that do not cross into the next text
            h, doc = _mix64(h[inside]), doc[inside]
            flat = sigs.reshape(-1)
            np.minimum.at(flat, doc * BINS + (h >> np.uint64(58)).astype(np.int64), h & np.uint64(2**58 - 1))
        start = end
    return sigs


def similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Estimated Jaccard similarity of two MinHash signatures (bins empty in both are ignored)."""
    return float(similarities(a[None], b[None])[0])


def similarities(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """`similarity` of each row of `a` with the same row of `b`."""
    used = (a != _EMPTY) | (b != _EMPTY)
    return ((a == b) & used).sum(axis=1) / np.maximum(1, used.sum(axis=1))


def deduplicate(docs: Sequence[str]) -> tuple[list[int], int, int]:
    """(indices of the documents kept, exact duplicates, near duplicates); the first of each group is kept."""
    norms = [normalise(d) for d in docs]
    sigs = minhash_many(norms)
    exact = np.array([exact_key(n) for n in norms], dtype="S16")
    keys, filled = band_keys(sigs)
    rows, cols = np.nonzero(filled)
    pairs = candidate_pairs(keys[rows, cols], rows.astype(np.int64), exact[rows], sigs.__getitem__)
    pairs = verify(pairs, norms.__getitem__)
    status = settle(len(docs), exact_duplicates(exact, np.arange(len(docs))), pairs, norms.__getitem__)
    return np.flatnonzero(status == KEPT).tolist(), int((status == EXACT).sum()), int((status == NEAR).sum())


def doc_hash(text: str, salt: str = "") -> float:
    """A deterministic number in [0, 1) for a document (independent of Python's hash randomisation)."""
    return norm_hash(normalise(text), salt)


def norm_hash(norm: str, salt: str = "") -> float:
    """`doc_hash` of an already normalised text."""
    digest = hashlib.blake2b(norm.encode(), digest_size=8, person=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / 2**64


KEPT, EXACT, NEAR = 0, 1, 2  # what became of a document


def exact_key(norm: str) -> bytes:
    """The exact-duplicate key of a normalised text."""
    return hashlib.blake2b(norm.encode(), digest_size=16).digest()


def densified(sigs: np.ndarray) -> np.ndarray:
    """Signatures with every empty bin filled from the next non-empty bin to its right (circularly), rehashed
    with the distance: densified one-permutation hashing (Shrivastava and Li, 2014), under which each bin of two
    texts is equal with probability their Jaccard similarity. Without it, a short text's bands are mostly empty
    bins, and any two short texts sharing one 5-gram (a signature line, a date) share a band."""
    twice = np.concatenate([sigs, sigs], axis=1)
    at = np.where(twice != _EMPTY, np.arange(2 * BINS), 2 * BINS)
    nearest = np.minimum.accumulate(at[:, ::-1], axis=1)[:, ::-1][:, :BINS]  # 2 * BINS: no value at all
    value = np.take_along_axis(twice, np.minimum(nearest, 2 * BINS - 1), axis=1)
    distance = (nearest - np.arange(BINS)).astype(np.uint64)
    moved = _mix64(value ^ (distance * np.uint64(0x9E3779B97F4A7C15)))
    return np.where(nearest == 2 * BINS, _EMPTY, np.where(distance == 0, value, moved))


def band_keys(sigs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys (n, BANDS) int64, filled (n, BANDS) bool) of MinHash signatures: a 64-bit hash of each band's values
    (`densified`) and its number, so that equal bands of different numbers differ; a text without 5-grams has
    no keys. Two bands with one key are candidates only, which the similarity check confirms or not."""
    keys, filled = np.zeros((len(sigs), BANDS), dtype=np.int64), np.zeros((len(sigs), BANDS), dtype=bool)
    for start in range(0, len(sigs), 4096):  # a few MB of temporaries at a time
        rows = densified(sigs[start:start + 4096]).reshape(-1, BANDS, BINS // BANDS)
        filled[start:start + 4096] = ~(rows == _EMPTY).all(axis=2)
        h = np.broadcast_to(np.arange(1, BANDS + 1, dtype=np.uint64), rows.shape[:2]).copy()
        for j in range(rows.shape[2]):
            h = _mix64(h * np.uint64(0x9E3779B97F4A7C15) ^ rows[:, :, j])
        keys[start:start + 4096] = h.view(np.int64)
    return keys, filled




def partition_of(keys: np.ndarray, parts: int) -> np.ndarray:
    """The partition of each 64-bit key (band keys and exact keys are hashes already): keys are spread over
    `parts` workers by it, and all documents of one key meet in one partition."""
    return (keys.view(np.uint64) % np.uint64(parts)).astype(np.int64)


def exact_halves(exact: np.ndarray) -> np.ndarray:
    """Exact keys (S16) as (n, 2) uint64."""
    return np.ascontiguousarray(exact, dtype="S16").view("<u8").reshape(-1, 2)


def exact_duplicates(exact: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """The numbers (sorted) of the documents whose exact key (`exact`, S16, of documents `docs`) an earlier
    document has: all of a key's documents but the first."""
    h = exact_halves(exact)
    order = np.lexsort((docs, h[:, 1], h[:, 0]))
    h, d = h[order], np.asarray(docs)[order]
    later = np.zeros(len(d), dtype=bool)
    later[1:] = (h[1:] == h[:-1]).all(axis=1)
    return np.sort(d[later])


# A candidate pair of documents: its MinHash estimate and, once `verify` has looked, whether the two are near
# duplicates (1), are not (0), or it did not look (-1).
PAIR = np.dtype([("later", "<i8"), ("earlier", "<i8"), ("estimate", "<f8"), ("near", "i1")])


VERIFY_TRIES = 8  # unsure candidates `verify` checks per document before it leaves the rest to `settle`


def _maybe_near(estimates: np.ndarray) -> np.ndarray:
    """Pairs that may be near duplicates: estimated at NEAR_DUP or above, or too close to it to call."""
    return (estimates >= NEAR_DUP) | (np.abs(estimates - NEAR_DUP) < UNSURE)


def candidate_pairs(keys: np.ndarray, docs: np.ndarray, exact: np.ndarray,
                    sigs_of: Callable[[np.ndarray], np.ndarray], window: int | None = None) -> np.ndarray:
    """Candidate near-duplicate pairs (PAIR: later, earlier, MinHash estimate) among LSH band entries: document
    docs[k] has band key keys[k] (int64), its exact key is exact[k] (S16); `sigs_of` gives signatures by number.

    Under each of its band keys, a document is paired with the first window // 2 documents of the key (the
    likeliest to be kept, by the "first kept" rule) and the last window // 2 before it (window: BUCKET), so that
    the pairs grow with the number of documents, not with the size of a family of near copies or of a key many
    texts share (a signature line, a template: near duplicates share several bands besides it). The exact
    copies of a document share all its keys and are left out (they are exact duplicates). Pairs whose estimate is
    clearly below NEAR_DUP are dropped here; a pair found under several keys comes back once."""
    window = BUCKET if window is None else window
    h = exact_halves(exact)
    order = np.lexsort((docs, h[:, 1], h[:, 0], keys))
    k, d, h = keys[order], np.asarray(docs, dtype=np.int64)[order], h[order]
    copy = np.zeros(len(k), dtype=bool)
    copy[1:] = (k[1:] == k[:-1]) & (h[1:] == h[:-1]).all(axis=1)
    k, d = k[~copy], d[~copy]
    order = np.lexsort((d, k))
    k, d = k[order], d[order]
    starts = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1]))) if len(k) else np.zeros(0, dtype=np.int64)
    first = np.repeat(starts, np.diff(np.append(starts, len(k))))
    pos = np.arange(len(k))
    later, earlier = [np.zeros(0, dtype=np.int64)], [np.zeros(0, dtype=np.int64)]
    head = window // 2
    for step in range(head):  # the key's first documents
        ok = np.flatnonzero(pos > first + step)
        later.append(d[ok])
        earlier.append(d[first[ok] + step])
    for step in range(1, window - head + 1):  # the documents just before, after the first ones
        ok = np.flatnonzero(pos - step >= first + head)
        if not len(ok):
            break
        later.append(d[ok])
        earlier.append(d[ok - step])
    both = np.unique(np.concatenate(later) << 31 | np.concatenate(earlier))  # < 2**31 documents per language
    pairs = np.zeros(len(both), dtype=PAIR)
    pairs["later"], pairs["earlier"], pairs["near"] = both >> 31, both & (2**31 - 1), -1
    for start in range(0, len(pairs), 65536):  # signatures of 65,536 pairs: 64 MB
        chunk = pairs[start:start + 65536]
        chunk["estimate"] = similarities(sigs_of(chunk["later"]), sigs_of(chunk["earlier"]))
    return pairs[_maybe_near(pairs["estimate"])]


def _sorted_pairs(pairs: np.ndarray) -> np.ndarray:
    """Pairs by later document, the highest estimate first, each pair once (the one `verify` looked at)."""
    pairs = pairs[np.lexsort((-pairs["near"], pairs["earlier"], -pairs["estimate"], pairs["later"]))]
    once = np.ones(len(pairs), dtype=bool)
    once[1:] = (pairs["later"][1:] != pairs["later"][:-1]) | (pairs["earlier"][1:] != pairs["earlier"][:-1])
    return pairs[once]


def _is_near(estimate: float, a: str | None, b: str | None) -> bool:
    """The near-duplicate test of two texts from their MinHash estimate, and where it is too close to call,
    their exact Jaccard similarity (normalised texts a and b; None: not needed)."""
    if abs(estimate - NEAR_DUP) < UNSURE:
        return jaccard(a, b) >= NEAR_DUP
    return estimate >= NEAR_DUP


def verify(pairs: np.ndarray, norm: Callable[[int], str], tries: int = VERIFY_TRIES) -> np.ndarray:
    """Candidate pairs (PAIR) with `near` filled in where it can be decided ahead of `settle`, in parallel over
    ranges of later documents: each document's candidates, the highest estimate first, are checked until one is
    near (at most `tries` exact checks); those after it are left to `settle`, which needs them only when that
    one was itself removed. Returns the pairs sorted by later document and estimate, each pair once."""
    pairs = _sorted_pairs(pairs)
    near = pairs["near"]
    later, earlier, estimate = pairs["later"].tolist(), pairs["earlier"].tolist(), pairs["estimate"].tolist()
    last, done, checks, mine = -1, False, 0, ""
    for k, (j, i, e) in enumerate(zip(later, earlier, estimate, strict=True)):
        if j != last:
            last, done, checks, mine = j, False, 0, ""
        if done or near[k] >= 0:
            done = done or near[k] == 1
            continue
        unsure = abs(e - NEAR_DUP) < UNSURE
        if unsure and checks >= tries:
            continue
        if unsure:
            checks += 1
            mine = mine or norm(j)
        near[k] = _is_near(e, norm(i) if unsure else None, mine if unsure else None)
        done = near[k] == 1
    return pairs


def settle(n: int, exact_dups: np.ndarray, pairs: np.ndarray, norm: Callable[[int], str]) -> np.ndarray:
    """What becomes of each of n documents (KEPT, EXACT or NEAR), from the exact duplicates and the candidate
    pairs of any partitions (PAIR; a pair may come more than once): in document order, a document is a near
    duplicate when a pair joins it to a kept document before it and the two are near, by the estimate or, where
    it is within UNSURE of NEAR_DUP, by the exact `jaccard` of their normalised texts (`norm`). 64 MinHash bins
    estimate a similarity of 0.8 with a standard deviation of 0.05, so that a quarter of the pairs just above the
    threshold would be missed on the estimate alone. Only kept documents are compared with, and only until one
    is near, so that a family of copies costs about one check per copy whatever its size."""
    status = np.zeros(n, dtype=np.uint8)
    status[exact_dups] = EXACT
    if not len(pairs):
        return status
    pairs = _sorted_pairs(pairs)
    later, earlier, estimate = pairs["later"].tolist(), pairs["earlier"].tolist(), pairs["estimate"].tolist()
    state = bytearray(status.tobytes())
    mine: tuple[int, str] | None = None  # the later document's text, for its next pair
    for j, i, e, known in zip(later, earlier, estimate, pairs["near"].tolist(), strict=True):
        if state[j] != KEPT or state[i] != KEPT or known == 0:
            continue  # already settled, not a kept document, or verified not near
        if known < 0 and abs(e - NEAR_DUP) < UNSURE:
            if mine is None or mine[0] != j:
                mine = (j, norm(j))
            if jaccard(norm(i), mine[1]) < NEAR_DUP:
                continue
        elif known < 0 and e < NEAR_DUP:
            continue
        state[j] = NEAR
    return np.frombuffer(bytes(state), dtype=np.uint8).copy()
