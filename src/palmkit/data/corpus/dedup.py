"""Exact and near-duplicate removal (MinHash + LSH over character 5-grams) and hash-based splits."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Sequence

import numpy as np

SHINGLE, BINS, BANDS, NEAR_DUP = 5, 64, 8, 0.8


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
        key = hashlib.blake2b(norm.encode(), digest_size=16).digest()
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
    digest = hashlib.blake2b(normalise(text).encode(), digest_size=8, person=salt.encode()[:16]).digest()
    return int.from_bytes(digest, "big") / 2**64
