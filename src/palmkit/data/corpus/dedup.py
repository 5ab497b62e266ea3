"""Exact and near-duplicate removal (MinHash + LSH over character 5-grams) and hash-based splits.

`deduplicate` holds a list of documents in memory; `DuplicateIndex` makes the same decisions one document at a
time with its state in an SQLite file (the exact keys, the LSH buckets of the documents kept), for corpora larger
than memory: a document is dropped as an exact duplicate when its normalised text was seen before, as a near
duplicate when it shares an LSH band with a kept document whose estimated Jaccard similarity is at least NEAR_DUP.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

SHINGLE, BINS, NEAR_DUP = 5, 64, 0.8

# LSH bands of BINS // BANDS values: two texts of Jaccard similarity J share a band with probability
# 1 - (1 - J ** 4) ** 16, 0.9998 at the 0.8 threshold (8 bands of 8 values found only 77% of such pairs); pairs
# well below it (J = 0.3: 12%) only cost a similarity check.
BANDS = 16


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
        codes = np.frombuffer("".join(norms[start:end]).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
        n = len(codes) - SHINGLE + 1
        if n > 0:
            h = np.zeros(n, dtype=np.uint64)
            for j in range(SHINGLE):
                h = h * np.uint64(1_000_003) + codes[j:j + n]
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
    used = (a != _EMPTY) | (b != _EMPTY)
    return float(((a == b) & used).sum() / max(1, used.sum()))


def deduplicate(docs: Sequence[str]) -> tuple[list[int], int, int]:
    """(indices of the documents kept, exact duplicates, near duplicates); the first of each group is kept."""
    norms = [normalise(d) for d in docs]
    sigs = minhash_many(norms)
    filled = ~(sigs.reshape(len(docs), BANDS, -1) == _EMPTY).all(axis=2)  # bands with at least one value
    width = sigs.itemsize * BINS // BANDS
    seen: set[bytes] = set()
    bands: dict[bytes, list[int]] = defaultdict(list)
    kept, exact, near = [], 0, 0
    for i, norm in enumerate(norms):
        key = exact_key(norm)
        if key in seen:
            exact += 1
            continue
        seen.add(key)
        raw = sigs[i].tobytes()
        keys = [bytes([b]) + raw[b * width:(b + 1) * width] for b in range(BANDS) if filled[i, b]]
        candidates = {j for k in keys for j in bands.get(k, ())}
        if any(similarity(sigs[i], sigs[j]) >= NEAR_DUP for j in candidates):
            near += 1
            continue
        for k in keys:
            bands[k].append(i)
        kept.append(i)
    return kept, exact, near


def deduplicate_and_key(docs: list[str]) -> tuple[list[int], int, int, list[float], list[float]]:
    """`deduplicate`, plus the order and validation hashes of the documents kept (one worker per language)."""
    kept, exact, near = deduplicate(docs)
    return kept, exact, near, [doc_hash(docs[i], "order") for i in kept], [doc_hash(docs[i], "valid") for i in kept]


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


def band_keys(sigs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys (n, BANDS) int64, filled (n, BANDS) bool) of MinHash signatures: a 64-bit hash of each band's values
    and its number, so that equal bands of different numbers differ; a band of empty bins has no key. Two bands
    with one key are candidates only, which the similarity check confirms or not."""
    rows = sigs.reshape(len(sigs), BANDS, -1)
    filled = ~(rows == _EMPTY).all(axis=2)
    h = np.broadcast_to(np.arange(1, BANDS + 1, dtype=np.uint64), rows.shape[:2]).copy()
    for j in range(rows.shape[2]):
        h = _mix64(h * np.uint64(0x9E3779B97F4A7C15) ^ rows[:, :, j])
    return h.view(np.int64), filled


class DuplicateIndex:
    """`deduplicate`'s decisions for a stream of documents, with its state on disk (SQLite).

    Documents are numbered in the order they are added; `sig_of(i)` reads the signature of an earlier document
    (kept on disk by the caller), so memory does not grow with the number of documents.
    """

    def __init__(self, path: Path, sig_of: Callable[[int], np.ndarray], cache_mb: int = 64):
        path.unlink(missing_ok=True)  # a scratch file: an interrupted build starts it again
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", f"cache_size=-{cache_mb * 1024}", "temp_store=FILE"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE exact (key BLOB PRIMARY KEY) WITHOUT ROWID")
        self.db.execute("CREATE TABLE bands (key INTEGER, doc INTEGER, PRIMARY KEY (key, doc)) WITHOUT ROWID")
        self.db.execute("BEGIN")
        self.sig_of, self.count = sig_of, 0

    def add(self, key: bytes, sig: np.ndarray, bands: np.ndarray) -> int:
        """KEPT, EXACT or NEAR for the next document: its exact key, signature and the keys of its filled bands."""
        doc, self.count = self.count, self.count + 1
        if not self.db.execute("INSERT OR IGNORE INTO exact VALUES (?)", (key,)).rowcount:
            return EXACT
        bands = bands.tolist()
        if bands:
            marks = ",".join("?" * len(bands))
            for (other,) in self.db.execute(f"SELECT DISTINCT doc FROM bands WHERE key IN ({marks})", bands):
                if similarity(sig, self.sig_of(other)) >= NEAR_DUP:
                    return NEAR
            self.db.executemany("INSERT INTO bands VALUES (?, ?)", [(b, doc) for b in bands])
        return KEPT

    def close(self) -> None:
        self.db.execute("COMMIT")
        self.db.close()
