"""Classical baselines the pipeline must beat, computed on the same split as the pipeline.

Each baseline takes the visible interactions and returns top-K lists (user, item, rank) for
the given users, seen items excluded, so `tasks.evaluate.ranking_metrics` scores them exactly
as it scores the pipeline's written table.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import scipy.sparse as sp

K = 10


@dataclass(frozen=True)
class Matrix:
    """Visible interactions as a binary users x items matrix, with id lookups and recency."""

    users: np.ndarray  # user_id of each row
    items: np.ndarray  # item_id of each column
    binary: sp.csr_matrix
    age: sp.csr_matrix  # per (user, item): 1 + events after it in the user's history (1 = latest)

    @classmethod
    def build(cls, visible: pl.DataFrame) -> "Matrix":
        events = (
            visible.sort("user_id", "timestamp", "item_id")
            .unique(["user_id", "item_id"], keep="last", maintain_order=True)
            .with_columns(
                pl.col("user_id").rank("dense").cast(pl.Int64).alias("row") - 1,
                pl.col("item_id").rank("dense").cast(pl.Int64).alias("column") - 1,
                (pl.len().over("user_id") - pl.int_range(pl.len()).over("user_id")).alias("age"),
            )
        )
        shape = (int(events["row"].max()) + 1, int(events["column"].max()) + 1)
        rows, columns = events["row"].to_numpy(), events["column"].to_numpy()
        binary = sp.csr_matrix((np.ones(rows.size, np.float32), (rows, columns)), shape=shape)
        age = sp.csr_matrix((events["age"].to_numpy().astype(np.float32), (rows, columns)), shape=shape)
        users = events.unique("row").sort("row")["user_id"].to_numpy()
        items = events.unique("column").sort("column")["item_id"].to_numpy()
        return cls(users, items, binary, age)

    def top_k(self, score_rows, users: list[str], block: int = 2048) -> pl.DataFrame:
        """Top-K unseen items for `users` from `score_rows(rows) -> dense scores`."""
        row_of = {user: row for row, user in enumerate(self.users)}
        rows = np.array([row_of[user] for user in users if user in row_of])
        frames = []
        for start in range(0, rows.size, block):
            chunk = rows[start : start + block]
            scores = np.asarray(score_rows(chunk), dtype=np.float64)
            seen = self.binary[chunk].nonzero()
            scores[seen] = -np.inf
            top = np.argpartition(-scores, K, axis=1)[:, :K]
            top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1, kind="stable"), 1)
            frames.append(
                pl.DataFrame(
                    {
                        "user": np.repeat(self.users[chunk], K),
                        "item": self.items[top.ravel()],
                        "rank": np.tile(np.arange(1, K + 1, dtype=np.int32), chunk.size),
                    }
                )
            )
        return pl.concat(frames)


def popularity(matrix: Matrix, users: list[str]) -> pl.DataFrame:
    counts = np.asarray(matrix.binary.sum(axis=0)).ravel()
    return matrix.top_k(lambda rows: np.broadcast_to(counts, (rows.size, counts.size)).copy(), users)


def item_knn(matrix: Matrix, users: list[str], shrink: float = 10.0) -> pl.DataFrame:
    """Item-based kNN with shrunk cosine similarity over all co-rated items."""
    co = (matrix.binary.T @ matrix.binary).toarray()
    norms = np.sqrt(np.diag(co))
    similarity = co / (np.outer(norms, norms) + shrink)
    np.fill_diagonal(similarity, 0.0)
    return matrix.top_k(lambda rows: matrix.binary[rows] @ similarity, users)


def ease_weights(matrix: Matrix, l2: float = 200.0) -> np.ndarray:
    """EASE (Steck 2019): closed-form item-item weights with a zero diagonal."""
    gram = (matrix.binary.T @ matrix.binary).toarray().astype(np.float64)
    gram[np.diag_indices_from(gram)] += l2
    precision = np.linalg.inv(gram)
    weights = -precision / np.diag(precision)
    np.fill_diagonal(weights, 0.0)
    return weights


def ease(matrix: Matrix, users: list[str], weights: np.ndarray) -> pl.DataFrame:
    return matrix.top_k(lambda rows: matrix.binary[rows] @ weights, users)


def recency_ease(matrix: Matrix, users: list[str], weights: np.ndarray, half_life: float = 5.0) -> pl.DataFrame:
    """EASE scored from a history where an item's weight halves every `half_life` later events."""
    recent = matrix.age.copy()
    recent.data = np.power(0.5, (recent.data - 1.0) / half_life).astype(np.float32)
    return matrix.top_k(lambda rows: recent[rows] @ weights, users)


def ials(matrix: Matrix, users: list[str], factors: int, regularization: float, alpha: float, seed: int = 0):
    """Implicit ALS (Hu, Koren, Volinsky 2008) from the `implicit` package."""
    from implicit.als import AlternatingLeastSquares

    model = AlternatingLeastSquares(
        factors=factors, regularization=regularization, alpha=alpha, iterations=15, random_state=seed
    )
    model.fit(matrix.binary.tocsr(), show_progress=False)
    user_factors, item_factors = _numpy(model.user_factors), _numpy(model.item_factors)
    return matrix.top_k(lambda rows: user_factors[rows] @ item_factors.T, users)


def _numpy(array) -> np.ndarray:
    return array.to_numpy() if hasattr(array, "to_numpy") else np.asarray(array)
