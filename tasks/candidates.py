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
ITEM_BITS = 0xFFFFFFFF  # the low half of _strongest's keys: an item's complement
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
    parts = []
    for start in range(0, recent.shape[0], BLOCK_USERS):
        scores = covisitation(similarity, recent[start : start + BLOCK_USERS], half_life)
        places = _places(scores, *_rows_between(exclude, start, start + BLOCK_USERS))
        parts.append(_strongest(scores, places[places >= 0], n, None)[0])
    return np.concatenate(parts) if parts else np.zeros((0, n), np.int64)


def _block(queries, item_embeddings, tower_items, tower_scores, recent, similarity, exclude, item_popularity, activity,
           sources: CandidateSources, allowed: np.ndarray | None) -> tuple[np.ndarray, ...]:
    users = np.arange(queries.shape[0])
    scores = covisitation(similarity, recent, sources.half_life)
    # one look-up of the pairs co-visitation may not propose: the user's excluded items and
    # the two-tower's candidates, whose co-visitation scores are a ranker feature
    places = _places(scores, np.concatenate([exclude[0], np.repeat(users, tower_items.shape[1])]),
                     np.concatenate([exclude[1], tower_items.ravel()]))
    covisit_items, covisit_scores = _strongest(scores, places[places >= 0], sources.covisitation, allowed)
    tower_places = places[exclude[0].size :].reshape(tower_items.shape)
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
            np.concatenate([_stored(scores, tower_places), covisit_scores], axis=1),
            _at(similarity[recent[:, 0]], items),
            np.broadcast_to(np.arange(items.shape[1]) >= tower_items.shape[1], items.shape),
        ],
        axis=-1,
    ).astype(np.float32)
    return items, two_tower, numeric, real


def _strongest(scores: sp.csr_matrix, blocked: np.ndarray, n: int,
               allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(items, scores): each row's `n` stored items of highest positive score, best first
    (ties: the lower item), never item 0, the entry at a place of `blocked` (in
    `scores.data`) or an item outside `allowed`; item 0 and score 0 past the last.

    One integer key per stored entry orders by both: the score's bits (a positive float's
    bits order as the floats do) above the item's complement. Each row's keys are laid side
    by side, padded with 0 (below every kept entry) to the longest row, and partitioned.
    The work follows the stored entries whatever the catalogue's size, and needs them in no
    order within a row: the product's rows are never sorted."""
    rows = scores.shape[0]
    if n == 0:
        return np.zeros((rows, 0), np.int64), np.zeros((rows, 0), np.float32)
    keys = np.left_shift(scores.data.astype(np.float32).view(np.int32), 32, dtype=np.int64)
    keys |= np.invert(scores.indices.astype(np.uint32))
    drop = ~(scores.data > 0) | (scores.indices == 0)
    if allowed is not None:
        drop |= ~allowed[scores.indices]
    drop[blocked] = True
    keys[drop] = 0
    lengths = np.diff(scores.indptr)
    width = max(n, int(lengths.max(initial=0)))
    laid = np.zeros((rows, width), np.int64)
    laid[np.repeat(np.arange(rows), lengths), np.arange(scores.nnz) - np.repeat(scores.indptr[:-1], lengths)] = keys
    top = -np.sort(-np.partition(laid, width - n, axis=1)[:, width - n :], axis=1)
    items = np.where(top > 0, ITEM_BITS - (top & ITEM_BITS), 0)
    return items, (top >> 32).astype(np.int32).view(np.float32)


def _places(scores: sp.csr_matrix, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """The place in `scores.data` of each (row, item) pair, -1 where it is not stored. One
    pass over the stored entries (scipy's element-wise product with the pairs), in
    whatever order a row holds them."""
    if rows.size == 0:
        return np.zeros(0, np.int64)
    places = sp.csr_matrix((np.arange(1, scores.nnz + 1, dtype=np.float64), scores.indices, scores.indptr),
                           shape=scores.shape)
    asked = sp.csr_matrix((np.ones(rows.size), (rows, items)), shape=scores.shape)
    asked.data[:] = 1.0  # a pair asked twice
    found = places.multiply(asked).tocsr()  # the asked pairs that are stored, their place + 1
    found.sort_indices()
    return np.asarray(found[rows, items]).ravel().astype(np.int64) - 1


def _at(scores: sp.csr_matrix, items: np.ndarray) -> np.ndarray:
    """The score of each row's `items` (0 where none is stored)."""
    return _stored(scores, _places(scores, np.repeat(np.arange(items.shape[0]), items.shape[1]), items.ravel())
                   .reshape(items.shape))


def _stored(scores: sp.csr_matrix, places: np.ndarray) -> np.ndarray:
    """The value stored at each of `places` in `scores.data`; 0 at place -1 (the 0 appended)."""
    return np.append(scores.data, np.float32(0)).astype(np.float32, copy=False)[places]


def _rows_between(pairs: tuple[np.ndarray, np.ndarray], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    rows, items = pairs
    inside = (rows >= start) & (rows < stop)
    return rows[inside] - start, items[inside]
