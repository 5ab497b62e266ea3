"""The documents of one extraction task on disk: their text, MinHash signatures and keys, read back by position.

A streaming build keeps no documents in memory between its stages: extraction writes each task's documents here
(`docs.bin`: the UTF-8 texts one after another; `sigs.bin`: 64 MinHash values per document; `meta.npy`: offset,
size, the order and validation hashes and the exact-duplicate key; `bands.npy`: the LSH band keys of the
documents, sorted by their dedup partition, which `band_starts.npy` indexes), and the later stages read what they
need.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from palmkit.data.corpus.dedup import BINS, band_keys, exact_key, minhash_many, norm_hash, normalise, partition_of

META = np.dtype([("offset", "<i8"), ("size", "<i8"), ("order", "<f8"), ("valid", "<f8"), ("exact", "S16")])


SIG_BYTES = BINS * 8


BAND = np.dtype([("key", "<i8"), ("doc", "<i8")])  # an LSH band key of document `doc` (its index in the task)


class DocWriter:
    """Appends documents to a task's folder; `close` writes the index (`meta.npy`)."""

    def __init__(self, folder: Path, parts: int = 1):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.parts = folder, parts
        self.docs = open(folder / "docs.bin", "wb")
        self.sigs = open(folder / "sigs.bin", "wb")
        self.meta: list[np.ndarray] = []
        self.bands: list[np.ndarray] = []
        self.offset = self.count = 0

    def add(self, texts: list[str]) -> None:
        """Append a batch of documents (hashed together: MinHash is fastest over many texts at once)."""
        if not texts:
            return
        norms = [normalise(t) for t in texts]
        sigs = minhash_many(norms, chunk_chars=sum(map(len, norms)) + 1)
        self.sigs.write(sigs.tobytes())
        keys, filled = band_keys(sigs)
        rows, cols = np.nonzero(filled)
        bands = np.zeros(len(rows), dtype=BAND)
        bands["key"], bands["doc"] = keys[rows, cols], self.count + rows
        self.bands.append(bands)
        self.count += len(texts)
        meta = np.zeros(len(texts), dtype=META)
        for i, (text, norm) in enumerate(zip(texts, norms, strict=True)):
            raw = text.encode("utf-8")
            self.docs.write(raw)
            meta[i] = (self.offset, len(raw), norm_hash(norm, "order"), norm_hash(norm, "valid"), exact_key(norm))
            self.offset += len(raw)
        self.meta.append(meta)

    def close(self) -> int:
        """Finish the files; returns the number of documents."""
        for f in (self.docs, self.sigs):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        meta = np.concatenate(self.meta) if self.meta else np.zeros(0, dtype=META)
        np.save(self.folder / "meta.npy", meta)
        bands = np.concatenate(self.bands) if self.bands else np.zeros(0, dtype=BAND)
        part = partition_of(bands["key"], self.parts)
        order = np.lexsort((bands["doc"], bands["key"], part))
        np.save(self.folder / "bands.npy", bands[order])
        np.save(self.folder / "band_starts.npy", np.searchsorted(part[order], np.arange(self.parts + 1)))
        return len(meta)


class DocReader:
    """Reads a task's documents and signatures by position, without mapping the files into memory."""

    def __init__(self, folder: Path):
        self.meta = np.load(folder / "meta.npy", allow_pickle=False)
        self._docs = os.open(folder / "docs.bin", os.O_RDONLY)
        self._sigs = os.open(folder / "sigs.bin", os.O_RDONLY)

    def __len__(self) -> int:
        return len(self.meta)

    def text(self, i: int) -> str:
        return os.pread(self._docs, int(self.meta["size"][i]), int(self.meta["offset"][i])).decode("utf-8")

    def sig_bytes(self, i: int) -> bytes:
        """Document i's signature, BINS uint64 values as bytes."""
        return os.pread(self._sigs, SIG_BYTES, i * SIG_BYTES)

    def sigs(self, start: int, stop: int) -> np.ndarray:
        """Signatures of documents [start, stop) as a (stop - start, BINS) array."""
        raw = os.pread(self._sigs, (stop - start) * SIG_BYTES, start * SIG_BYTES)
        return np.frombuffer(raw, dtype=np.uint64).reshape(-1, BINS)

    def close(self) -> None:
        os.close(self._docs)
        os.close(self._sigs)


def band_entries(folder: Path, part: int) -> np.ndarray:
    """The band entries (BAND) of a task's documents that fall in dedup partition `part`."""
    starts = np.load(folder / "band_starts.npy")
    return np.load(folder / "bands.npy", mmap_mode="r")[starts[part]:starts[part + 1]].copy()
