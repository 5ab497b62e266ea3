"""The collaborative retriever: implicit-feedback ALS (Hu, Koren and Volinsky, ICDM 2008) fitted with `implicit`.

Only the item factors are kept. A user's factors are solved from their history whenever they are needed, with
the same least-squares step as ALS: x_u = (YᵀY + Yᵀ(C_u - I)Y + λI)⁻¹ Yᵀ C_u p_u, where C_u is α on the items
the user liked and 1 elsewhere (implicit's convention). So a history that grew after fitting (the test stage, a
served user) is scored without refitting, a history can be any list of items, and each item's share of a score
is exact: x_u · y_i = Σ_j α y_jᵀ A_u⁻¹ y_i over the liked items j.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from implicit.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

from palmkit.errors import PalmkitError
from palmkit.recommend.metrics import top_k


@dataclass(frozen=True)
class RetrieverConfig:
    """Options of the ALS retriever."""

    factors: int = 32
    """latent factors per user and item"""
    regularization: float = 0.05
    """L2 penalty λ on the factors"""
    alpha: float = 1.0
    """confidence of a like (C = α on liked items, 1 on the rest)"""
    iterations: int = 15
    """ALS sweeps (users then items)"""
    seed: int = 0
    """seed of the initial factors"""


def like_matrix(histories: Sequence[Sequence[int]], n_items: int) -> sp.csr_matrix:
    """The users x items 0/1 matrix of the histories (item indices)."""
    rows = [u for u, h in enumerate(histories) for _ in h]
    cols = [i for h in histories for i in h]
    m = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)),
                      shape=(len(histories), n_items))
    m.data[:] = 1.0  # an item listed twice is still one like
    return m


class Retriever:
    """Item factors of ALS; user factors solved per history; scores for every item."""

    def __init__(self, item_factors: np.ndarray, regularization: float, alpha: float):
        self.item_factors = np.asarray(item_factors, dtype=np.float64)
        self.regularization, self.alpha = float(regularization), float(alpha)
        y = self.item_factors
        self._base = y.T @ y + self.regularization * np.eye(y.shape[1])

    @classmethod
    def fit(cls, histories: Sequence[Sequence[int]], n_items: int, cfg: RetrieverConfig = RetrieverConfig()
            ) -> Retriever:
        """ALS on the histories (one list of liked item indices per user)."""
        likes = like_matrix(histories, n_items)
        if likes.nnz == 0:
            raise PalmkitError("no likes to fit the retriever on")
        # implicit runs its own threads; a BLAS thread pool inside each would oversubscribe the cores (the
        # limit is set here, so implicit's warning that the environment does not set it says nothing new)
        with threadpool_limits(1, "blas"), warnings.catch_warnings():
            warnings.filterwarnings("ignore", "OpenBLAS is configured", RuntimeWarning)
            model = AlternatingLeastSquares(factors=cfg.factors, regularization=cfg.regularization,
                                            alpha=cfg.alpha, iterations=cfg.iterations, random_state=cfg.seed)
            model.fit(likes, show_progress=False)
        return cls(model.item_factors, cfg.regularization, cfg.alpha)

    def _system(self, history: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """(A_u, b_u) of the user's least-squares step."""
        y = self.item_factors[sorted(set(history))]
        return self._base + (self.alpha - 1.0) * y.T @ y, self.alpha * y.sum(0)

    def user_factors(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(U, factors): each history's solved user factors (zeros for an empty history)."""
        out = np.zeros((len(histories), self.item_factors.shape[1]))
        for u, history in enumerate(histories):
            if len(history):
                a, b = self._system(history)
                out[u] = np.linalg.solve(a, b)
        return out

    def scores(self, histories: Sequence[Sequence[int]]) -> np.ndarray:
        """(U, items) predicted preference of each user for every item."""
        return self.user_factors(histories) @ self.item_factors.T

    def candidates(self, histories: Sequence[Sequence[int]], n: int = 100,
                   exclude: Sequence[Collection[int]] | None = None) -> np.ndarray:
        """(U, n) the best n items of each history, best first, leaving out `exclude` (default: the history)."""
        return top_k(self.scores(histories), histories if exclude is None else exclude, n)

    def contributions(self, history: Sequence[int], item: int) -> dict[int, float]:
        """Each liked item's exact share of the user's score for `item` (the shares sum to the score)."""
        if not len(history):
            return {}
        a, _ = self._system(history)
        w = np.linalg.solve(a, self.item_factors[item])
        return {j: float(self.alpha * self.item_factors[j] @ w) for j in sorted(set(history))}
