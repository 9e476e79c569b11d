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
from tasks.inference import retrieve

BLOCK_USERS = 512  # users whose co-visitation scores are drawn at once (a row: at most history x NEIGHBOURS items)
DENSE_FROM = 0.1  # share of a block's users x catalogue stored from which its scores are laid out dense
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
    graph=None,
) -> Candidates:
    """Candidates for the users whose query embeddings are `queries`.

    `recent` (users, L) holds each user's latest items, newest first (model indices, 0 =
    padding); `similarity` is the item-item co-occurrence similarity (`item_similarity`) of
    the events that form those histories; `exclude` holds (row, item) pairs never to
    propose (what the user has already seen, what the business excludes for them);
    `allowed` (a mask over the items; None = all) the only items either source may propose
    (tonight's servable items); `activity` is each user's number of events. The two-tower
    proposes at least `at_least` items (a list of K needs K candidates), searched through
    `graph` where the model has one (`retrieve`).
    """
    tower_items, tower_scores = retrieve(queries, item_embeddings, exclude, max(sources.two_tower, at_least),
                                         allowed=allowed, graph=graph)
    blocks = [
        _block(queries[start : start + BLOCK_USERS], item_embeddings, tower_items[start : start + BLOCK_USERS],
               tower_scores[start : start + BLOCK_USERS], recent[start : start + BLOCK_USERS], similarity,
               _rows_between(exclude, start, start + BLOCK_USERS), item_popularity,
               activity[start : start + BLOCK_USERS], sources, allowed)
        for start in range(0, queries.shape[0], BLOCK_USERS)
    ]
    if not blocks:
        n = tower_items.shape[1] + sources.covisitation
        return Candidates(np.zeros((0, n), np.int64), np.zeros((0, n), np.float32),
                          np.zeros((0, n, len(FEATURES)), np.float32), np.zeros((0, n), bool))
    return Candidates(*(np.concatenate(parts) for parts in zip(*blocks)))


def covisitation(similarity: sp.csr_matrix, recent: np.ndarray, half_life: float) -> sp.csr_matrix:
    """Sparse (users, catalogue) scores: the similarity of every item to each user's recent
    history, an item's weight halving every `half_life` later events (as in
    recency-weighted EASE). Only items that co-occur with the history are stored: a user's
    row holds at most history length x NEIGHBOURS entries, whatever the catalogue's size."""
    weights = np.power(0.5, np.arange(recent.shape[1]) / half_life).astype(np.float32)
    rows, positions = np.nonzero(recent)
    history = sp.csr_matrix(
        (weights[positions], (rows, recent[rows, positions])), shape=(recent.shape[0], similarity.shape[0])
    )
    return (history @ similarity).tocsr()


def covisited(similarity: sp.csr_matrix, recent: np.ndarray, exclude: tuple[np.ndarray, np.ndarray], half_life: float,
              n: int) -> np.ndarray:
    """Each user's `n` items with the highest co-visitation score (never one in `exclude`),
    best first; 0 where fewer items co-occur with the history at all."""
    parts = [
        _Laid(covisitation(similarity, recent[start : start + BLOCK_USERS], half_life))
        .strongest(_rows_between(exclude, start, start + BLOCK_USERS), n, None)
        for start in range(0, recent.shape[0], BLOCK_USERS)
    ]
    return np.concatenate(parts) if parts else np.zeros((0, n), np.int64)


def _block(queries, item_embeddings, tower_items, tower_scores, recent, similarity, exclude, item_popularity, activity,
           sources: CandidateSources, allowed: np.ndarray | None) -> tuple[np.ndarray, ...]:
    users = np.arange(queries.shape[0])
    scores = _Laid(covisitation(similarity, recent, sources.half_life))
    taken = (np.concatenate([exclude[0], np.repeat(users, tower_items.shape[1])]),
             np.concatenate([exclude[1], tower_items.ravel()]))
    covisit_items = scores.strongest(taken, sources.covisitation, allowed)
    items = np.concatenate([tower_items, covisit_items], axis=1)
    real = np.concatenate([np.isfinite(tower_scores), covisit_items > 0], axis=1)
    two_tower = np.einsum("ud,und->un", queries, item_embeddings[items]).astype(np.float32)
    position = np.concatenate([np.arange(tower_items.shape[1]), np.arange(covisit_items.shape[1])])
    numeric = np.stack(
        [
            two_tower,
            np.broadcast_to(np.log1p(position), items.shape),
            np.log1p(item_popularity[items]),
            np.broadcast_to(np.log1p(activity)[:, None], items.shape),
            scores.at(items),
            _Laid(similarity[recent[:, 0]]).at(items),
            np.broadcast_to(np.arange(items.shape[1]) >= tower_items.shape[1], items.shape),
        ],
        axis=-1,
    ).astype(np.float32)
    return items, two_tower, numeric, real


class _Laid:
    """One score row per user (a block's sparse co-visitation scores), laid out to pick from:
    as dense rows when at least DENSE_FROM of the block's users x catalogue is stored, else
    each row's stored entries side by side, columns ascending, as wide as the block's longest
    row (padding scores 0, column 0). Either way the work follows the smaller of the stored
    entries and the catalogue."""

    def __init__(self, scores: sp.csr_matrix):
        self.width = scores.shape[1]
        if scores.nnz >= DENSE_FROM * scores.shape[0] * scores.shape[1]:
            self.grid = scores.toarray()
            self.columns, self.keys = np.broadcast_to(np.arange(self.width), self.grid.shape), None
            return
        scores.sort_indices()
        lengths = np.diff(scores.indptr)
        rows = np.repeat(np.arange(scores.shape[0]), lengths)
        self.place = np.arange(scores.nnz) - np.repeat(scores.indptr[:-1], lengths)
        self.grid = np.zeros((scores.shape[0], max(1, int(lengths.max(initial=0)))), np.float32)
        self.columns = np.zeros(self.grid.shape, np.int64)
        self.grid[rows, self.place], self.columns[rows, self.place] = scores.data, scores.indices
        self.keys = rows.astype(np.int64) * self.width + scores.indices  # ascending

    def _find(self, rows: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(whether each (row, item) is stored, its place in its grid row)."""
        if self.keys is None:
            return np.ones(items.shape, bool), items
        if not self.keys.size:
            return np.zeros(items.shape, bool), np.zeros(items.shape, np.int64)
        wanted = rows.astype(np.int64) * self.width + items
        at = np.minimum(np.searchsorted(self.keys, wanted), self.keys.size - 1)
        return self.keys[at] == wanted, self.place[at]

    def at(self, items: np.ndarray) -> np.ndarray:
        """The score of each user's `items` (0 where none is stored)."""
        found, place = self._find(np.arange(items.shape[0])[:, None], items)
        return np.where(found, np.take_along_axis(self.grid, np.where(found, place, 0), 1), 0).astype(np.float32)

    def strongest(self, exclude: tuple[np.ndarray, np.ndarray], n: int, allowed: np.ndarray | None) -> np.ndarray:
        """Each row's `n` items of highest positive score, best first (ties: the lower item),
        never item 0, a (row, item) pair of `exclude` or an item outside `allowed`; 0 past the
        last."""
        blocked = (self.columns == 0) | (self.grid <= 0)
        if allowed is not None:
            blocked |= ~allowed[self.columns]
        found, place = self._find(*exclude)
        blocked[exclude[0][found], place[found]] = True
        grid = np.where(blocked, -np.inf, self.grid)
        if grid.shape[1] < n:  # fewer stored than asked: padding, never chosen
            grid = np.pad(grid, ((0, 0), (0, n - grid.shape[1])), constant_values=-np.inf)
        top = _top(grid, n)
        columns = np.take_along_axis(self.columns, np.minimum(top, self.columns.shape[1] - 1), 1)
        return np.where(np.isfinite(np.take_along_axis(grid, top, 1)), columns, 0)


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """The columns of each row's `n` highest scores, highest first (ties: the lower column)."""
    if n == 0:
        return np.zeros((scores.shape[0], 0), np.int64)
    top = np.sort(np.argpartition(-scores, n - 1, axis=1)[:, :n], axis=1)
    return np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), 1, kind="stable"), 1)


def _rows_between(pairs: tuple[np.ndarray, np.ndarray], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    rows, items = pairs
    inside = (rows >= start) & (rows < stop)
    return rows[inside] - start, items[inside]
