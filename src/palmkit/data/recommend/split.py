"""Ratings -> implicit feedback (a rating of 4 or 5 out of 5 is a like) and a temporal split per user.

Each user's ratings are put in time order (ties in file order). Of the user's likes the last `test_share` are the
test items, the `valid_share` before them the validation items, and the rest the training history; a user with
fewer than `min_likes` likes keeps them all as history. A stage's history holds only likes from before its first
target, and every item rated before that moment (liked or not) counts as seen: it is never ranked for the user.
No item from after a target leaks into the history that predicts it. Other users' later behaviour does
shape the collaborative model, as in every per-user split (a global time cut would avoid that, at the price of
users with no test items).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from palmkit.data.recommend.movielens import Rating
from palmkit.errors import PalmkitError

Stage = Literal["valid", "test"]


def implicit_feedback(ratings: Sequence[Rating], threshold: float = 4.0) -> list[Rating]:
    """The ratings that count as likes: `rating >= threshold` (4 of 5 stars: liked, not merely watched)."""
    return [r for r in ratings if r.rating >= threshold]


@dataclass
class FeedbackSplit:
    """Per-user likes split by time, and what each user had seen at each stage."""

    items: list[str]  # the whole catalogue, in item-file order: every ranking is over these
    train: dict[str, list[str]]  # likes before the validation items, oldest first
    valid: dict[str, list[str]]
    test: dict[str, list[str]]
    seen: dict[str, dict[str, set[str]]]  # stage -> user -> items rated before the stage's first target
    rated: dict[str, set[str]]  # every item the user rated: training negatives are drawn outside it
    threshold: float

    @property
    def users(self) -> list[str]:
        return list(self.train)

    def history(self, user: str, stage: Stage | Literal["all"]) -> list[str]:
        """The user's likes known before the stage's targets, oldest first ("all": every like)."""
        parts = {"valid": (self.train,), "test": (self.train, self.valid),
                 "all": (self.train, self.valid, self.test)}[stage]
        return [item for part in parts for item in part.get(user, [])]

    def targets(self, stage: Stage) -> dict[str, list[str]]:
        """user -> the liked items to find, for users that have some."""
        return {u: items for u, items in (self.valid if stage == "valid" else self.test).items() if items}

    def histories(self, stage: Stage | Literal["all"]) -> dict[str, list[str]]:
        """Every user's history at the stage: what a collaborative model of that stage is fitted on."""
        return {u: self.history(u, stage) for u in self.users}


def temporal_split(ratings: Sequence[Rating], items: Sequence[str], threshold: float = 4.0,
                   test_share: float = 0.2, valid_share: float = 0.1, min_likes: int = 3) -> FeedbackSplit:
    """Split each user's likes by time into training history, validation and test items (module docstring)."""
    if not 0 < test_share < 1 or not 0 < valid_share < 1 or test_share + valid_share >= 1:
        raise PalmkitError("test_share and valid_share must be in (0, 1) with a sum below 1")
    catalogue = set(items)
    by_user: dict[str, dict[str, tuple[float, int, float]]] = defaultdict(dict)
    for n, r in enumerate(ratings):
        if r.item not in catalogue:
            raise PalmkitError(f"rating {n + 1}: item {r.item} is not in the catalogue")
        by_user[r.user][r.item] = (r.time, n, r.rating)  # a later rating of the same item replaces the earlier
    split = FeedbackSplit(list(items), {}, {}, {}, {"valid": {}, "test": {}}, {}, threshold)
    for user, rated in by_user.items():
        ordered = sorted(rated, key=lambda item: rated[item][:2])
        likes = [i for i, item in enumerate(ordered) if rated[item][2] >= threshold]
        n_test = n_valid = 0
        if len(likes) >= min_likes:
            n_test = max(1, round(test_share * len(likes)))
            n_valid = max(1, round(valid_share * len(likes)))
        n_train = len(likes) - n_test - n_valid
        liked = [ordered[i] for i in likes]
        split.train[user] = liked[:n_train]
        split.valid[user] = liked[n_train:n_train + n_valid]
        split.test[user] = liked[n_train + n_valid:]
        for stage, first in (("valid", n_train), ("test", n_train + n_valid)):
            cut = likes[first] if first < len(likes) else len(ordered)
            split.seen[stage][user] = set(ordered[:cut])
        split.rated[user] = set(ordered)
    return split
