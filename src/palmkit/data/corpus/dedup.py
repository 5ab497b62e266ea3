"""Exact and near-duplicate removal (MinHash + LSH over character 5-grams) and hash-based splits.

A document is dropped as an exact duplicate when its normalised text was seen before, as a near duplicate when it
shares an LSH band with a kept document and their Jaccard similarity is at least NEAR_DUP (estimated by MinHash,
computed exactly where the estimate is too close to call); the first of each group is kept. `deduplicate`
decides a list of documents in memory, `DuplicateIndex` the same for a stream of any length a block at a time,
with what later blocks need of the earlier ones in sorted runs on disk.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

SHINGLE, BINS, NEAR_DUP = 5, 64, 0.8


UNSURE = 0.15  # three standard deviations of the estimate at NEAR_DUP: closer estimates are checked exactly

# LSH bands of BINS // BANDS values: two texts of Jaccard similarity J share a band with probability
# 1 - (1 - J ** 4) ** 16, 0.9998 at the 0.8 threshold (8 bands of 8 values found only 77% of such pairs); pairs
# well below it (J = 0.3: 12%) only cost a similarity check.
BANDS = 16


BUCKET = 64  # kept documents one LSH band key holds at most (see `decide`)


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


def near(estimates: np.ndarray, a: Sequence[int], b: Sequence[int], norm: Callable[[int], str]) -> np.ndarray:
    """Which pairs of documents (a[k], b[k]) are near duplicates, from their estimated similarities: where an
    estimate is within UNSURE of NEAR_DUP, the exact `jaccard` of their normalised texts (`norm`) decides. 64
    MinHash bins estimate a similarity of 0.8 with a standard deviation of 0.05, so that a quarter of the pairs
    just above the threshold would be missed on the estimate alone."""
    result = estimates >= NEAR_DUP
    for k in np.flatnonzero(np.abs(estimates - NEAR_DUP) < UNSURE).tolist():
        result[k] = jaccard(norm(int(a[k])), norm(int(b[k]))) >= NEAR_DUP
    return result


def deduplicate(docs: Sequence[str]) -> tuple[list[int], int, int]:
    """(indices of the documents kept, exact duplicates, near duplicates); the first of each group is kept."""
    norms = [normalise(d) for d in docs]
    status, _ = decide(np.array([exact_key(n) for n in norms], dtype="S16"), minhash_many(norms), norms.__getitem__)
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


def decide(exact: np.ndarray, sigs: np.ndarray, norm: Callable[[int], str], seen: np.ndarray | None = None,
           close: np.ndarray | None = None, held: dict[int, int] | None = None,
           bands: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """What becomes of each document of a block, in order (KEPT, EXACT or NEAR), and which of its LSH bands
    enter the index, (n, BANDS) bool.

    `exact` holds the exact keys (S16), `sigs` the signatures, `norm(i)` is a normalised text. A document is an
    exact duplicate when its key comes earlier in the block or was `seen` before it, a near duplicate when it is
    `close` to a document kept before the block, or shares an LSH band with a document kept earlier in the block
    and the two are `near`. Only kept documents are compared with, so a group of copies costs one comparison
    each whatever its size. A band key held by BUCKET kept documents (`held`: how many before the block) takes no
    more: such a key is a 5-gram run many texts share (a signature line, a template), and near duplicates share
    several bands besides it. `bands`: the signatures' `band_keys`, where the caller has them already."""
    status = np.full(len(exact), KEPT, dtype=np.uint8)
    _, first = np.unique(exact, return_index=True)
    later = np.ones(len(exact), dtype=bool)
    later[first] = False
    status[later if seen is None else later | seen] = EXACT
    if close is not None:
        status[(status == KEPT) & close] = NEAR
    keys, filled = band_keys(sigs) if bands is None else bands
    admitted = np.zeros(keys.shape, dtype=bool)
    held = held or {}
    buckets: dict[int, list[int]] = {}
    for i in np.flatnonzero(status == KEPT).tolist():
        own = [(b, k) for b, (k, f) in enumerate(zip(keys[i].tolist(), filled[i].tolist(), strict=True)) if f]
        others = sorted({j for _, k in own for j in buckets.get(k, ())})
        if others and near(similarities(sigs[[i]], sigs[others]), [i] * len(others), others, norm).any():
            status[i] = NEAR
            continue
        for b, k in own:
            bucket = buckets.setdefault(k, [])
            if len(bucket) + held.get(k, 0) < BUCKET:
                bucket.append(i)
                admitted[i, b] = True
    return status, admitted


_PAIR = np.dtype([("key", "<i8"), ("value", "<i8")])


class _Runs:
    """(key, value) pairs written a sorted run at a time to files of a folder, matched against sorted keys by one
    pass over every run, a chunk in memory at a time."""

    chunk = 1 << 20  # pairs read at a time (16 MB)

    def __init__(self, folder: Path, name: str):
        self.paths: list[Path] = []
        self.folder, self.name = folder, name

    def write(self, keys: np.ndarray, values: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        pairs = np.empty(len(keys), dtype=_PAIR)
        pairs["key"], pairs["value"] = keys[order], values[order]
        self.paths.append(self.folder / f"{self.name}-{len(self.paths):06d}.bin")
        pairs.tofile(self.paths[-1])

    def matches(self, keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(i, value) arrays of the pairs in the runs whose key is keys[i], a chunk of the runs at a time; `keys`
        sorted."""
        unique, starts, counts = np.unique(keys, return_index=True, return_counts=True)
        for path in self.paths if len(keys) else []:
            total = path.stat().st_size // _PAIR.itemsize
            for start in range(0, total, self.chunk):
                pairs = np.fromfile(path, dtype=_PAIR, count=min(self.chunk, total - start),
                                    offset=start * _PAIR.itemsize)
                at = np.minimum(np.searchsorted(unique, pairs["key"]), len(unique) - 1)
                hit = unique[at] == pairs["key"]
                if hit.any():  # keys[starts[u]:starts[u] + counts[u]] equal the pair's key: one match each
                    lo, n = starts[at[hit]], counts[at[hit]]
                    step = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
                    yield np.repeat(lo, n) + step, np.repeat(pairs["value"][hit], n)


class DuplicateIndex:
    """`deduplicate`'s decisions for a stream of documents given a block at a time, earlier blocks kept on disk.

    A block's exact keys and LSH band keys are matched against sorted runs written by the earlier blocks (the
    exact keys they saw first, the band keys of the documents they kept), and its candidate pairs are checked
    with the kept documents' signatures and normalised texts, read back by number (`sigs_of`, `norm_of`); then
    `decide` settles the block in memory. Memory holds one block whatever the number of documents. Every block
    reads all runs once (a merge pass), so that reading grows with the square of the number of blocks; what that
    costs from 0.1 to 4 GB of input is in benchmarks/README.md ("bench_corpus.py").
    """

    def __init__(self, folder: Path, sigs_of: Callable[[np.ndarray], np.ndarray], norm_of: Callable[[int], str]):
        folder.mkdir(parents=True, exist_ok=False)
        self.exact, self.bands = _Runs(folder, "exact"), _Runs(folder, "bands")
        self.sigs_of, self.norm_of, self.count = sigs_of, norm_of, 0

    def add(self, exact: np.ndarray, sigs: np.ndarray) -> np.ndarray:
        """Statuses of the next block of documents (exact keys, S16, and signatures), numbered after the last."""
        n = len(exact)
        halves = np.ascontiguousarray(exact, dtype="S16").view("<i8").reshape(n, 2)
        order = np.argsort(halves[:, 0], kind="stable")
        seen = np.zeros(n, dtype=bool)
        for i, low in self.exact.matches(halves[order, 0]):
            seen[order[i[low == halves[order[i], 1]]]] = True
        keys, filled = band_keys(sigs)
        rows, cols = np.nonzero(filled & ~seen[:, None])
        flat = keys[rows, cols]
        order = np.argsort(flat, kind="stable")
        close = np.zeros(n, dtype=bool)
        held = np.zeros(len(flat), dtype=np.int64)  # kept documents before the block with each key
        for i, other in self.bands.matches(flat[order]):
            held += np.bincount(i, minlength=len(flat))
            pair = np.unique(rows[order[i]].astype(np.int64) << 40 | other)  # one check per pair of documents
            mine, other = pair >> 40, pair & (2**40 - 1)
            docs, where = np.unique(other, return_inverse=True)
            estimates = similarities(sigs[mine], self.sigs_of(docs)[where])
            close[mine[near(estimates, self.count + mine, other, self.norm_of)]] = True
        some = held > 0
        status, admitted = decide(exact, sigs, lambda k: self.norm_of(self.count + k), seen, close,
                                  dict(zip(flat[order][some].tolist(), held[some].tolist(), strict=True)),
                                  (keys, filled))
        new = status != EXACT
        self.exact.write(halves[new, 0], halves[new, 1])
        rows, cols = np.nonzero(admitted)
        self.bands.write(keys[rows, cols], self.count + rows)
        self.count += n
        return status
