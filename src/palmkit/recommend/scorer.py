"""The language-model scorer: (history text, candidate text) -> liked or not, fine-tuned from a pretrained PaLM.

Two towers share the model: the user's text (the titles of their latest likes, oldest first) and the candidate's
text (title, year, genres) are read separately, each summed up by its last token's state (EOS) and projected by
its own linear map; the logit is their scaled dot product plus a bias. A cross-encoder that reads both texts at
once would have to run the model on every (user, item) pair; with two towers each item is encoded once and each
user once per history, so ranking the whole catalogue for a user is one matrix product, which is what makes a
full-ranking evaluation of the model affordable on a CPU. Fine-tuning uses palmkit.finetune (fit, heads, LoRA)
on pairs: each liked item with the likes before it, and items the user never rated as negatives.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from torch import nn

from palmkit.data.recommend import FeedbackSplit, Movie
from palmkit.errors import PalmkitError
from palmkit.finetune.encode import Item, encode_text
from palmkit.finetune.fit import FinetuneConfig, Objective, fit, prepare
from palmkit.finetune.heads import SequenceClassifier
from palmkit.finetune.predict import load_head, predict_logits
from palmkit.model.palm import PaLM
from palmkit.model.tokenizer import Tokenizer

TASK = "recommend"


@dataclass(frozen=True)
class ScorerConfig:
    """Shape of the language-model scorer's inputs and vectors."""

    dim: int = 64
    """size of the user and item vectors"""
    item_len: int = 32
    """tokens of an item's text (title, year, genres)"""
    history_len: int = 96
    """tokens of a user's text: the titles of as many of their latest likes as fit"""
    negatives: int = 1
    """never-rated items drawn for each liked item in the training pairs"""


class PairHead(nn.Module):
    """The two projections and the bias: what the scorer adds to the pretrained model (head.safetensors)."""

    def __init__(self, user: nn.Linear, item: nn.Linear):
        super().__init__()
        self.user, self.item = user, item
        self.bias = nn.Parameter(torch.zeros(1, device=user.weight.device))

    def all_pairs(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """(U, I) logits of every user vector with every item vector."""
        return users @ items.T / math.sqrt(users.shape[-1]) + self.bias


class TwoTower(nn.Module):
    """Liked-or-not logits of (history, candidate) rows: history ids ending in EOS, then the candidate's ids
    ending in EOS, right-padded. Causal attention lets the history be read in place: its EOS state never sees
    the candidate that follows it."""

    def __init__(self, model: PaLM, eos_id: int, dim: int = 64, dropout: float = 0.1):
        super().__init__()
        self.model, self.eos_id = model, eos_id
        self.users = SequenceClassifier(model, dim, "last", dropout)
        self.items = SequenceClassifier(model, dim, "last", dropout)
        self.head = PairHead(self.users.head, self.items.head)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, 1) logits."""
        cut = (ids == self.eos_id).int().argmax(1) + 1  # the history's length: up to its EOS
        width = int((lengths - cut).max())
        shifted = (cut[:, None] + torch.arange(width, device=ids.device)[None]).clamp(max=ids.shape[1] - 1)
        users = self.users(ids[:, : int(cut.max())], cut)
        items = self.items(ids.gather(1, shifted), lengths - cut)
        return ((users * items).sum(-1) / math.sqrt(users.shape[-1]) + self.head.bias)[:, None]


class PairEncoder:
    """Token ids of item texts and of history texts; each movie's pieces are encoded once."""

    def __init__(self, tokenizer: Tokenizer, movies: Sequence[Movie], cfg: ScorerConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.items = [encode_text(tokenizer, m.text, cfg.item_len) for m in movies]
        self.names = [tokenizer.encode(m.name) for m in movies]
        self.sep = tokenizer.encode(";")

    def history(self, history: Sequence[int]) -> list[int]:
        """The latest likes' titles that fit history_len, oldest first, separated by ';', then EOS."""
        budget, parts = self.cfg.history_len - 1, []
        for i in reversed(history):
            piece = self.names[i] + self.sep
            if len(piece) > budget:
                break
            parts.append(piece)
            budget -= len(piece)
        return [t for p in reversed(parts) for t in p] + [self.tokenizer.eos_id]

    def pair(self, history: Sequence[int], item: int, liked: bool) -> Item:
        return Item(self.history(history) + self.items[item], int(liked))


def _negatives(rng: random.Random, n_items: int, rated: set[int], count: int) -> list[int]:
    """`count` distinct items outside `rated`, drawn uniformly."""
    if n_items - len(rated) < count:
        return []
    out: set[int] = set()
    while len(out) < count:
        i = rng.randrange(n_items)
        if i not in rated:
            out.add(i)
    return sorted(out)


def training_pairs(histories: Sequence[Sequence[int]], rated: Sequence[set[int]], n_items: int, max_pairs: int,
                   negatives: int, seed: int = 0) -> list[tuple[list[int], int, bool]]:
    """(history, item, liked) triples: a seeded sample of the liked items that have likes before them, each with
    those earlier likes as its history (nothing later), and `negatives` never-rated items with the same history.
    max_pairs: at most this many triples (0: all)."""
    rng = random.Random(seed)
    positions = [(u, j) for u, h in enumerate(histories) for j in range(1, len(h))]
    keep = max_pairs // (1 + negatives) if max_pairs else len(positions)
    if keep < len(positions):
        positions = rng.sample(positions, keep)
    out = []
    for u, j in positions:
        history = list(histories[u][:j])
        out.append((history, histories[u][j], True))
        out += [(history, i, False) for i in _negatives(rng, n_items, rated[u], negatives)]
    return out


def validation_pairs(split: FeedbackSplit, index: dict[str, int], max_pairs: int, seed: int = 0
                     ) -> list[tuple[list[int], int, bool]]:
    """Validation likes with their users' training histories, each beside one never-rated item."""
    rng = random.Random(seed + 1)
    out = []
    for user, items in split.targets("valid").items():
        history = [index[i] for i in split.history(user, "valid")]
        rated = {index[i] for i in split.rated[user]}
        for item in items:
            out.append((history, index[item], True))
            out += [(history, i, False) for i in _negatives(rng, len(index), rated, 1)]
    if max_pairs and len(out) > max_pairs:
        out = rng.sample(out, max_pairs)
    return out


def _pair_loss(module, ids, lengths, targets):
    return F.binary_cross_entropy_with_logits(module(ids, lengths)[:, 0], targets.float())


def finetune_scorer(checkpoint: str, out: str, split: FeedbackSplit, movies: dict[str, Movie],
                    train: FinetuneConfig = FinetuneConfig(), scorer: ScorerConfig = ScorerConfig(),
                    resume: bool = False, device: str = "") -> dict:
    """Fine-tune the two-tower scorer from CHECKPOINT on the split's training likes; OUT holds the model that did
    best on validation pairs (ROC AUC), as `finetune` writes it. Returns the best validation record.

    It runs on the training engine as `finetune` does: --device, --train.dtype, torchrun, --resume."""
    items = split.items
    index = {item: i for i, item in enumerate(items)}
    model, tokenizer, _ = prepare(checkpoint, train, device)
    encoder = PairEncoder(tokenizer, [movies[i] for i in items], scorer)
    histories = [[index[i] for i in split.history(u, "valid")] for u in split.users]
    rated = [{index[i] for i in split.rated[u]} for u in split.users]
    pairs = training_pairs(histories, rated, len(items), train.max_train, scorer.negatives, train.seed)
    valid = [encoder.pair(*p) for p in validation_pairs(split, index, train.max_valid, train.seed)]
    if not pairs or not valid:
        raise PalmkitError(f"{len(pairs)} training and {len(valid)} validation pairs: users need at least 3 likes")
    module = TwoTower(model, tokenizer.eos_id, scorer.dim, train.dropout)

    def validate() -> dict[str, float]:
        logits = torch.cat(predict_logits(module, valid, tokenizer.pad_id, train.batch_size * 2))
        y = torch.tensor([it.target for it in valid], dtype=torch.float32)
        return {"auc": float(roc_auc_score(y.numpy(), logits.numpy())),
                "loss": F.binary_cross_entropy_with_logits(logits, y).item()}

    extra = {"task": TASK, "scorer": asdict(scorer), "max_len": scorer.history_len + scorer.item_len,
             "data": "movielens-100k", "train_pairs": len(pairs)}
    objective = Objective([encoder.pair(*p) for p in pairs], _pair_loss, validate, "auc", extra)
    return fit(module, model, tokenizer, objective, train, out, resume=resume, device=device)


class TextScorer:
    """A fine-tuned scorer over a catalogue: item vectors computed once, user vectors per history."""

    def __init__(self, module: TwoTower, encoder: PairEncoder, item_vectors: torch.Tensor | None = None):
        self.module, self.encoder = module.eval(), encoder
        self._items = item_vectors  # saved with a recommender: loading then encodes no item

    def _vectors(self, tower: nn.Module, seqs: list[list[int]], batch_size: int) -> torch.Tensor:
        out = predict_logits(tower, [Item(ids) for ids in seqs], self.encoder.tokenizer.pad_id, batch_size)
        return torch.stack(out) if out else torch.empty(0, self.module.head.user.out_features)

    def item_vectors(self, batch_size: int = 64) -> torch.Tensor:
        """(I, dim) vectors of the whole catalogue (cached)."""
        if self._items is None:
            self._items = self._vectors(self.module.items, self.encoder.items, batch_size)
        return self._items

    def user_vectors(self, histories: Sequence[Sequence[int]], batch_size: int = 32) -> torch.Tensor:
        """(U, dim) vectors of the histories (lists of liked item indices, oldest first)."""
        return self._vectors(self.module.users, [self.encoder.history(h) for h in histories], batch_size)

    @torch.no_grad()
    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(U, I) logits of every history with every item."""
        return self.module.head.all_pairs(self.user_vectors(histories), self.item_vectors()).numpy()


def load_scorer(path: str | Path, movies: Sequence[Movie], device: str = "cpu", model: PaLM | None = None,
                tokenizer: Tokenizer | None = None, item_vectors: torch.Tensor | None = None) -> TextScorer:
    """The scorer of a `finetune_scorer` folder over `movies` (in the catalogue's order). A server that holds the
    folder's model passes it and its tokenizer to share the weights; `item_vectors`: the movies' vectors as
    this model computed them (saved with a recommender)."""
    model, tokenizer, config, head = load_head(Path(path), TASK, model, tokenizer, device)
    cfg = ScorerConfig(**config["scorer"])
    module = TwoTower(model, tokenizer.eos_id, cfg.dim, 0.0)
    module.head.load_state_dict(head)
    module.head.to(model.embed_tokens.weight.device)
    vectors = None if item_vectors is None else item_vectors.to(model.embed_tokens.weight.device)
    return TextScorer(module, PairEncoder(tokenizer, movies, cfg), vectors)
