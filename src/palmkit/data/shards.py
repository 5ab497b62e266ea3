"""Tokenised shards and the cross-lingual mixture that feeds pretraining.

Each language's documents are encoded as `BOS text EOS` (`encode_document`: the BOS rule of
palmkit.model.tokenizer, the EOS marking the end of the document) and concatenated into one
token stream stored as a memory-mapped uint16/uint32 array with a small JSON index. Sequences are
fixed windows of that stream with no padding (PaLM section 3): window i holds tokens
[i*T, i*T + T] (T+1 tokens, inputs and shifted targets), wrapping around at the end so that every
token is predicted exactly once per epoch. Training batches draw each sequence's language l with
probability proportional to n_l ** alpha (temperature sampling).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from palmkit.errors import PalmkitError
from palmkit.model.tokenizer import Tokenizer

SPLITS = ("train", "valid")  # a corpus's splits: text/<lang>/<split>.jsonl, shards/<lang>/<split>.bin


def encode_document(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """A pretraining document's tokens from its text's ids: BOS first (the rule every prompt follows, so that a
    model sees at inference what it saw in training) and EOS last (end of document)."""
    return [tokenizer.bos_id, *ids, tokenizer.eos_id]


def shard_dtype(tokenizer: Tokenizer) -> type[np.unsignedinteger]:
    """The smallest unsigned integer type that holds every token id of `tokenizer`."""
    return np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32


def shard_index(lang: str, tokenizer: Tokenizer) -> dict:
    """The head of a language's `index.json` (the split entries are added as they are written)."""
    return {"lang": lang, "dtype": np.dtype(shard_dtype(tokenizer)).name, "vocab_size": tokenizer.vocab_size,
            "eod_id": tokenizer.eos_id, "bos_id": tokenizer.bos_id}


def write_tokens(f: BinaryIO, tokenizer: Tokenizer, texts: list[str], dtype: type[np.unsignedinteger],
                 ) -> list[int]:
    """Append the encoded documents `texts` (`encode_document`) to the open file `f`; returns each one's tokens."""
    counts = []
    for ids in tokenizer.encode_batch(texts):
        ids = encode_document(tokenizer, ids)
        f.write(np.asarray(ids, dtype=dtype).tobytes())
        counts.append(len(ids))
    return counts


class TokenStream:
    """One language's split as a memory-mapped token array cut into wrapping windows of T+1 tokens."""

    def __init__(self, shard_dir: Path, split: str, seq_len: int):
        index_file = shard_dir / "index.json"
        if not index_file.is_file():
            raise PalmkitError(f"missing shard index {index_file}: run `palmkit corpus build` first")
        self.index = json.loads(index_file.read_text())
        info = self.index.get(split)
        if not info or not info["tokens"]:
            raise PalmkitError(f"no {split} tokens for language {self.index['lang']!r} in {shard_dir}")
        self.tokens = np.memmap(shard_dir / f"{split}.bin", dtype=self.index["dtype"], mode="r",
                                shape=(info["tokens"],))
        self.seq_len = seq_len
        self.bytes = info["bytes"]
        self.n_sequences = -(-len(self.tokens) // seq_len)

    def sequence(self, i: int) -> np.ndarray:
        """Window i: tokens [i*T, i*T + T] of the stream, wrapping at the end."""
        start, n = i * self.seq_len, len(self.tokens)
        idx = np.arange(start, start + self.seq_len + 1) % n
        return np.asarray(self.tokens[idx], dtype=np.int64)


def mixture_weights(sizes: dict[str, int], alpha: float) -> dict[str, float]:
    """Sampling probability of each language: n_l ** alpha, normalised (alpha 0 uniform, 1 proportional).

    A language of size 0 gets probability 0, even at alpha 0: there is nothing to draw from it.
    """
    w = {lang: float(n) ** alpha if n else 0.0 for lang, n in sizes.items()}
    total = sum(w.values()) or 1.0
    return {lang: v / total for lang, v in w.items()}


class MixtureLoader:
    """Batches of (inputs, targets) drawn from several languages by temperature sampling.

    Every rank draws the same global batch from the same RNG and keeps rows rank::world_size, so
    ranks see disjoint data and together exactly what a single process with the same global batch sees.
    """

    def __init__(self, corpus_dir: str | os.PathLike, seq_len: int, batch_size: int, alpha: float = 0.3,
                 seed: int = 0, rank: int = 0, world_size: int = 1, langs: list[str] | None = None):
        shard_root = Path(corpus_dir) / "shards"
        available = sorted(p.name for p in shard_root.iterdir() if (p / "index.json").is_file()) \
            if shard_root.is_dir() else []
        langs = list(langs or available)
        if not langs:
            raise PalmkitError(f"no token shards under {shard_root}: run `palmkit corpus build` first")
        missing = sorted(set(langs) - set(available))
        if missing:
            raise PalmkitError(f"no shards for language(s) {', '.join(missing)} under {shard_root}")
        if batch_size % world_size:
            raise PalmkitError(f"global batch of {batch_size} sequences does not split over {world_size} ranks")
        self.streams = {lang: TokenStream(shard_root / lang, "train", seq_len) for lang in langs}
        old = [lang for lang, s in self.streams.items() if "bos_id" not in s.index]
        if old:  # shards of an older palmkit: documents without BOS, unlike every prompt
            warnings.warn(f"shards of {', '.join(old)} under {shard_root} have no BOS before documents; rebuild "
                          "them (palmkit corpus build) so that training matches how prompts are encoded", stacklevel=2)
        self.langs = langs
        self.weights = mixture_weights({lang: len(s.tokens) for lang, s in self.streams.items()}, alpha)
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.rng = np.random.default_rng(seed)
        self.position = dict.fromkeys(langs, 0)
        self.epoch = dict.fromkeys(langs, 0)
        self._orders: dict[str, np.ndarray] = {}

    def _order(self, lang: str) -> np.ndarray:
        """The shuffled window order of a language's current epoch, a pure function of (seed, lang, epoch)."""
        key = (lang, self.epoch[lang])
        if self._orders.get(lang, (None, None))[0] != key:
            rng = np.random.default_rng([self.seed, self.epoch[lang], *lang.encode()])
            self._orders[lang] = (key, rng.permutation(self.streams[lang].n_sequences))
        return self._orders[lang][1]

    def _next_window(self, lang: str) -> tuple[int, int]:
        order = self._order(lang)
        if self.position[lang] >= len(order):
            self.epoch[lang] += 1
            self.position[lang] = 0
            order = self._order(lang)
        window = int(order[self.position[lang]])
        self.position[lang] += 1
        return window, self.epoch[lang]

    def draw(self) -> list[tuple[str, int]]:
        """The global batch as (language, window) pairs, advancing the shared state."""
        choice = self.rng.choice(len(self.langs), size=self.batch_size, p=[self.weights[x] for x in self.langs])
        return [(self.langs[c], self._next_window(self.langs[c])[0]) for c in choice]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """(inputs (B, T), targets (B, T), languages) for this rank's share of the next global batch."""
        mine = self.draw()[self.rank::self.world_size]
        seqs = np.stack([self.streams[lang].sequence(w) for lang, w in mine])
        seqs = torch.from_numpy(seqs)
        return seqs[:, :-1], seqs[:, 1:], [lang for lang, _ in mine]

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """JSON-serialisable loader state (saved inside training checkpoints)."""
        state = self.rng.bit_generator.state
        return {"rng": json.loads(json.dumps(state)), "position": dict(self.position), "epoch": dict(self.epoch),
                "seed": self.seed, "alpha_weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved state; the world size may differ from the one that saved it."""
        self.rng.bit_generator.state = state["rng"]
        self.position.update({k: int(v) for k, v in state["position"].items() if k in self.position})
        self.epoch.update({k: int(v) for k, v in state["epoch"].items() if k in self.epoch})


def validation_batches(corpus_dir: str | os.PathLike, lang: str, seq_len: int, batch_size: int,
                       max_sequences: int = 0, rank: int = 0, world_size: int = 1,
                       ) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int, float]:
    """(iterator of (inputs, targets) for this rank, total windows, UTF-8 bytes per token) of a language.

    The validation stream is cut into non-wrapping windows so that each held-out token is scored once.
    Every rank yields the same number of batches (sharded models need matching collectives); rows
    beyond a rank's share have all targets set to -100 and count for nothing.
    """
    stream = TokenStream(Path(corpus_dir) / "shards" / lang, "valid", seq_len)
    n = max(1, (len(stream.tokens) - 1) // seq_len)
    if max_sequences:
        n = min(n, max_sequences)
    bytes_per_token = stream.bytes / max(1, len(stream.tokens))
    per_rank = -(-n // world_size)
    mine = [*range(rank, n, world_size)]
    mine += [-1] * (per_rank - len(mine))
    width = min(seq_len, len(stream.tokens) - 1)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(mine), batch_size):
            rows = mine[i:i + batch_size]
            seqs = torch.from_numpy(np.stack([
                np.asarray(stream.tokens[max(j, 0) * seq_len: max(j, 0) * seq_len + width + 1], dtype=np.int64)
                for j in rows]))
            targets = seqs[:, 1:].clone()
            targets[torch.tensor(rows) < 0] = -100
            yield seqs[:, :-1], targets

    return batches(), n, bytes_per_token


def unigram_perplexity(corpus_dir: str | os.PathLike, lang: str) -> float:
    """Held-out perplexity of a add-one-smoothed unigram model fitted on the training tokens: the floor a
    language model must beat."""
    root = Path(corpus_dir) / "shards" / lang
    index = json.loads((root / "index.json").read_text())
    train = np.memmap(root / "train.bin", dtype=index["dtype"], mode="r")
    valid = np.memmap(root / "valid.bin", dtype=index["dtype"], mode="r")
    counts = np.bincount(train, minlength=index["vocab_size"]).astype(np.float64) + 1.0
    log_p = np.log(counts / counts.sum())
    return float(np.exp(-log_p[valid].mean()))
