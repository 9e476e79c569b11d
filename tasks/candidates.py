"""Candidates: the items each user's list is chosen from, drawn from two sources.

Production recommenders generate candidates from several sources and let a ranker sort
out their union. recflow has two:

- **two-tower**: the items nearest the user's query embedding. Learned, and it reads item
  content, so it reaches items with few events.
- **co-visitation**: the items that co-occur most with the user's recent history, each
  history item weighted by its recency (classical item-to-item). Strong where histories
  are short and items have no content, and it follows the catalogue's long tail.

A user's candidates are the two-tower's top `two_tower` items, then co-visitation's top
`covisitation` items not already among them (CandidateSources: the counts come from the
`candidates` config, the item similarity from the selection stage). Every
candidate carries both sources' scores and the other features the ranker reads
(FEATURES), whichever source proposed it. Ranker training (on the `valid` split), the
held-out evaluation and nightly scoring all draw candidates here, so the ranker learns
the blend of the sources on the data it will score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from schemas.tables import CandidateSources
from tasks.inference import BLOCK_SCORES, retrieve

FEATURES = (
    "two_tower_score",  # first: the ranker's output starts as this score (tasks/towers.py:Ranker)
    "log_source_rank",  # log(1 + position in the list of the source that proposed it)
    "log_item_popularity",
    "log_user_activity",
    "covisitation_score",
    "last_item_similarity",  # similarity to the user's latest item alone: the sequential signal
    "from_covisitation",  # 1 when co-visitation proposed it, 0 when the two-tower did
)


@dataclass(frozen=True)
class Candidates:
    """Each user's candidates, two-tower ones first: (users, n) arrays, and (users, n, F)
    ranker features."""

    items: np.ndarray  # model item indices
    two_tower: np.ndarray  # two-tower score (query . item embedding: unit vectors, a cosine)
    numeric: np.ndarray  # float32, FEATURES in order
    real: np.ndarray  # False where a user has fewer candidates than n


def generate(
    queries: np.ndarray,
    item_embeddings: np.ndarray,
    recent: np.ndarray,
    similarity: sp.csr_matrix,
    exclude: tuple[np.ndarray, np.ndarray],
    item_popularity: np.ndarray,
    activity: np.ndarray,
    sources: CandidateSources,
    at_least: int = 0,
    allowed: np.ndarray | None = None,
) -> Candidates:
    """Candidates for the users whose query embeddings are `queries`.

    `recent` (users, L) holds each user's latest items, newest first (model indices, 0 =
    padding); `similarity` is the item-item co-occurrence similarity (`item_similarity`) of
    the events that form those histories; `exclude` holds (row, item) pairs never to
    propose (what the user has already seen, what the business excludes for them);
    `allowed` (a mask over the items; None = all) the only items either source may propose
    (tonight's servable items); `activity` is each user's number of events. The two-tower
    proposes at least `at_least` items (a list of K needs K candidates).
    """
    n_two_tower = max(sources.two_tower, at_least)
    size = max(16, BLOCK_SCORES // item_embeddings.shape[0])  # users per block: dense scores stay ~32 MiB
    blocks = [
        _block(queries[start : start + size], item_embeddings, recent[start : start + size], similarity,
               _rows_between(exclude, start, start + size), item_popularity, activity[start : start + size],
               n_two_tower, sources, allowed)
        for start in range(0, queries.shape[0], size)
    ]
    if not blocks:
        n = n_two_tower + sources.covisitation
        return Candidates(np.zeros((0, n), np.int64), np.zeros((0, n), np.float32),
                          np.zeros((0, n, len(FEATURES)), np.float32), np.zeros((0, n), bool))
    return Candidates(*(np.concatenate(parts) for parts in zip(*blocks)))


def covisitation(similarity: sp.csr_matrix, recent: np.ndarray, half_life: float) -> np.ndarray:
    """Dense (users, catalogue) scores: the similarity of every item to each user's recent
    history, an item's weight halving every `half_life` later events (as in
    recency-weighted EASE)."""
    weights = np.power(0.5, np.arange(recent.shape[1]) / half_life).astype(np.float32)
    rows, positions = np.nonzero(recent)
    history = sp.csr_matrix(
        (weights[positions], (rows, recent[rows, positions])), shape=(recent.shape[0], similarity.shape[0])
    )
    return (history @ similarity).toarray()


def covisited(similarity: sp.csr_matrix, recent: np.ndarray, exclude: tuple[np.ndarray, np.ndarray], half_life: float,
              n: int) -> np.ndarray:
    """Each user's `n` items with the highest co-visitation score (never one in `exclude`),
    best first; 0 where fewer items co-occur with the history at all."""
    size = max(16, BLOCK_SCORES // similarity.shape[0])
    parts = []
    for start in range(0, recent.shape[0], size):
        scores = covisitation(similarity, recent[start : start + size], half_life)
        scores[:, 0] = -np.inf
        scores[_rows_between(exclude, start, start + size)] = -np.inf
        top = _top(scores, min(n, scores.shape[1] - 1))
        parts.append(np.where(np.take_along_axis(scores, top, 1) > 0, top, 0))
    return np.concatenate(parts) if parts else np.zeros((0, n), np.int64)


def _block(queries, item_embeddings, recent, similarity, exclude, item_popularity, activity, n_two_tower,
           sources: CandidateSources, allowed: np.ndarray | None) -> tuple[np.ndarray, ...]:
    users = np.arange(queries.shape[0])[:, None]
    tower_items, tower_scores = retrieve(queries, item_embeddings, exclude, n_two_tower, allowed=allowed)
    scores = covisitation(similarity, recent, sources.half_life)
    covisited = scores.copy()
    covisited[:, 0] = -np.inf
    if allowed is not None:
        covisited[:, ~allowed] = -np.inf
    covisited[exclude] = -np.inf
    covisited[users, tower_items] = -np.inf
    covisit_items = _top(covisited, min(sources.covisitation, max(covisited.shape[1] - 1, 0)))
    items = np.concatenate([tower_items, covisit_items], axis=1)
    real = np.concatenate([np.isfinite(tower_scores), np.take_along_axis(covisited, covisit_items, 1) > 0], axis=1)
    two_tower = np.einsum("ud,und->un", queries, item_embeddings[items]).astype(np.float32)
    position = np.concatenate([np.arange(tower_items.shape[1]), np.arange(covisit_items.shape[1])])
    numeric = np.stack(
        [
            two_tower,
            np.broadcast_to(np.log1p(position), items.shape),
            np.log1p(item_popularity[items]),
            np.broadcast_to(np.log1p(activity)[:, None], items.shape),
            np.take_along_axis(scores, items, axis=1),
            _similarity_to(similarity, recent[:, 0], items),
            np.broadcast_to(np.arange(items.shape[1]) >= tower_items.shape[1], items.shape),
        ],
        axis=-1,
    ).astype(np.float32)
    return items, two_tower, numeric, real


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """The columns of each row's `n` highest scores, highest first."""
    if n == 0:
        return np.zeros((scores.shape[0], 0), np.int64)
    top = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1, kind="stable"), 1)


def _similarity_to(similarity: sp.csr_matrix, latest: np.ndarray, items: np.ndarray) -> np.ndarray:
    """similarity(latest item, candidate) for each user's candidates (0 without a latest item)."""
    rows = similarity[latest]  # (users, catalogue), sparse
    return np.asarray(rows[np.arange(items.shape[0])[:, None], items].todense(), dtype=np.float32)


def _rows_between(pairs: tuple[np.ndarray, np.ndarray], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    rows, items = pairs
    inside = (rows >= start) & (rows < stop)
    return rows[inside] - start, items[inside]
