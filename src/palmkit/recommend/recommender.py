"""A recommender folder and its use: `load_recommender(DIR).recommend(user, k)`.

The folder is the fine-tuned scorer's checkpoint (config.json names task `recommend`; generate and serve load it
as a model) plus `recommender.json` (the catalogue, each user's likes and rated items, the combination's
weights) and `recommender.safetensors` (the retriever's item factors, like counts, the scorer's item vectors).
It holds MovieLens-derived data: keep it to yourself, as the data's terms ask (DATA.md).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from palmkit.data.recommend import Movie
from palmkit.errors import PalmkitError
from palmkit.io import atomic_write_json, claim_names, load_json, load_tensors, save_tensors
from palmkit.model.palm import PaLM
from palmkit.model.tokenizer import Tokenizer
from palmkit.recommend.combine import Combination
from palmkit.recommend.retriever import Retriever
from palmkit.recommend.scorer import TextScorer, load_scorer

RECOMMENDER_JSON = "recommender.json"
RECOMMENDER_TENSORS = "recommender.safetensors"
SYSTEMS = ("popularity", "retriever", "lm", "combination")


@dataclass
class Recommendation:
    """A ranked list for one user; `personalised` is false when it is the popularity list."""

    user: str | None
    personalised: bool
    items: list[dict]  # {"item", "title", "score", "because": [titles of history items]} best first
    history: list[str] = field(default_factory=list)  # titles of the likes the ranking read, oldest first
    notice: str = ""

    def text(self) -> str:
        """The list as the terminal shows it."""
        lines = [self.notice] if self.notice else []
        if self.history:
            shown = self.history[-5:]
            more = f" and {len(self.history) - 5} earlier" if len(self.history) > 5 else ""
            lines.append(f"user {self.user} liked: {'; '.join(shown)}{more}")
        label = "recommended" if self.personalised else "most popular (not personalised)"
        lines.append(f"{label}:")
        for rank, it in enumerate(self.items, 1):
            why = f"  <- {'; '.join(it['because'])}" if it.get("because") else ""
            score = f"{it['score']:7.3f}" if self.personalised else f"{int(it['score']):>4} likes"
            lines.append(f"{rank:>3}. {score}  {it['title']}{why}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return asdict(self)


class Recommender:
    """Signals (language model, retriever, popularity) over a catalogue, their combination, and the users."""

    def __init__(self, movies: Sequence[Movie], retriever: Retriever, popularity: np.ndarray,
                 scorer: TextScorer | None = None, combination: Combination | None = None,
                 likes: dict[str, list[str]] | None = None, rated: dict[str, Collection[str]] | None = None):
        self.movies = list(movies)
        self.index = {m.item: i for i, m in enumerate(self.movies)}
        self.retriever, self.popularity, self.scorer, self.combination = retriever, popularity, scorer, combination
        self.likes = likes or {}
        self.rated = {u: set(items) for u, items in (rated or {}).items()}

    def signals(self, histories: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """(U, I) scores of each signal for each history (item indices, oldest first)."""
        out = {"retriever": self.retriever.scores(histories),
               "popularity": np.tile(np.log1p(self.popularity.astype(np.float64)), (len(histories), 1))}
        if self.scorer is not None:
            out["lm"] = self.scorer.scores(histories).astype(np.float64)
        return out

    def system_scores(self, system: str, signals: dict[str, np.ndarray], exclude: Sequence[Collection[int]]
                      ) -> np.ndarray:
        """(U, I) scores by which one system ranks: one signal alone, or the combination."""
        if system == "combination":
            if self.combination is None:
                raise PalmkitError("this recommender has no fitted combination")
            return self.combination.scores(signals, exclude)
        if system not in signals:
            raise PalmkitError(f"unknown system {system!r}: one of {', '.join(SYSTEMS)}")
        return signals[system]

    def _entry(self, i: int, score: float, history: Sequence[int] = ()) -> dict:
        because = []
        if len(history):
            shares = self.retriever.contributions(history, i)
            because = [self.movies[j].name for j, s in sorted(shares.items(), key=lambda x: -x[1])[:2] if s > 0]
        return {"item": self.movies[i].item, "title": self.movies[i].name, "score": round(float(score), 4),
                "because": because}

    def popular(self, k: int = 10, exclude: Collection[str] = ()) -> list[dict]:
        """The k items with the most likes, less `exclude`; score: the number of likes."""
        hidden = {self.index[i] for i in exclude if i in self.index}
        order = [i for i in np.argsort(-self.popularity, kind="stable") if i not in hidden][:k]
        return [self._entry(int(i), float(self.popularity[i])) for i in order]

    def recommend_for(self, history: Sequence[str], k: int = 10, exclude: Collection[str] = (),
                      system: str = "combination", user: str | None = None) -> Recommendation:
        """The top k for a history of liked item ids (oldest first), leaving out the history and `exclude`."""
        unknown = [i for i in history if i not in self.index]
        if unknown:
            raise PalmkitError(f"unknown item id(s) {', '.join(map(str, unknown[:5]))}: the catalogue has "
                               f"{len(self.movies)} items")
        if k < 1:
            raise PalmkitError(f"k must be at least 1, got {k}")
        if not history:
            notice = (f"user {user} has liked nothing yet" if user is not None else "an empty history")
            return Recommendation(user, False, self.popular(k, exclude), [],
                                  f"{notice}: the most popular items instead, not personalised")
        ids = [self.index[i] for i in history]
        hidden = sorted(set(ids) | {self.index[i] for i in exclude if i in self.index})
        scores = self.system_scores(system, self.signals([ids]), [hidden])[0]
        scores[hidden] = -np.inf
        order = np.argsort(-scores, kind="stable")[:k]
        items = [self._entry(int(i), float(scores[i]), ids) for i in order if np.isfinite(scores[i])]
        return Recommendation(user, True, items, [self.movies[i].name for i in ids])

    def recommend(self, user: str, k: int = 10, system: str = "combination") -> Recommendation:
        """The top k for a known user (their likes as history, nothing they rated again); an unknown user gets
        the popularity list with a notice saying so."""
        user = str(user)
        if user not in self.likes:
            some = ", ".join(list(self.likes)[:3])
            return Recommendation(user, False, self.popular(k), [],
                                  f"unknown user {user!r} (this recommender knows {len(self.likes)} users, e.g. "
                                  f"{some}): the most popular items instead, not personalised")
        return self.recommend_for(self.likes[user], k, self.rated.get(user, ()), system, user)

    def save(self, folder: str | Path) -> None:
        """Write recommender.json and recommender.safetensors into the scorer's folder."""
        folder = Path(folder)
        claim_names(folder, [RECOMMENDER_TENSORS, RECOMMENDER_JSON])  # palmkit's, in the folder's manifest
        tensors = {"item_factors": torch.from_numpy(self.retriever.item_factors),
                   "popularity": torch.from_numpy(np.asarray(self.popularity, dtype=np.float64))}
        if self.scorer is not None:
            tensors["item_vectors"] = self.scorer.item_vectors()
        save_tensors(folder / RECOMMENDER_TENSORS, tensors, metadata={"format": "pt"})
        atomic_write_json(folder / RECOMMENDER_JSON, {
            "items": [[m.item, m.title, m.year, list(m.genres)] for m in self.movies],
            "retriever": {"regularization": self.retriever.regularization, "alpha": self.retriever.alpha},
            "combination": self.combination and asdict(self.combination),
            "users": {u: {"likes": self.likes[u], "rated": sorted(self.rated.get(u, ()), key=self.index.get)}
                      for u in self.likes}})


def load_recommender(path: str | Path, device: str = "cpu", model: PaLM | None = None,
                     tokenizer: Tokenizer | None = None) -> Recommender:
    """A Recommender from a `palmkit recipe recommend` folder (its model and tokenizer may be passed to share
    them, as a server does)."""
    path = Path(path)
    if not (path / RECOMMENDER_JSON).is_file():
        raise PalmkitError(f"{path}: not a recommender folder (no {RECOMMENDER_JSON}): "
                           "`palmkit recipe recommend` writes one")
    meta = load_json(path / RECOMMENDER_JSON, "recommender file")
    tensors = load_tensors(path / RECOMMENDER_TENSORS)
    movies = [Movie(i, title, year, tuple(genres)) for i, title, year, genres in meta["items"]]
    retriever = Retriever(tensors["item_factors"].numpy(), **meta["retriever"])
    scorer = load_scorer(path, movies, device, model, tokenizer, tensors.get("item_vectors"))
    combination = meta.get("combination")
    users = meta.get("users", {})
    return Recommender(movies, retriever, tensors["popularity"].numpy(), scorer,
                       Combination(tuple(combination["features"]), tuple(combination["weights"]),
                                   combination.get("validation_ndcg", float("nan"))) if combination else None,
                       {u: v["likes"] for u, v in users.items()}, {u: v["rated"] for u, v in users.items()})
