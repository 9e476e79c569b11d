"""Inference: what every stage that reads trained models shares.

Loading an exported retrieval model and retrieving each user's top-N unseen items, by
blocked matrix products (exact, the reference) or through a faiss HNSW graph of the item
embeddings (approximate, `retrieval.index`); mapping tonight's ids into a model's vocabulary (a champion
trained on an earlier night scores tonight's users); the classical item-to-item
similarity behind co-visitation candidates; and the settings recorded with a models
directory (its format, the selected candidate sources). Plain numpy, scipy and polars:
TensorFlow is imported only to load a SavedModel, faiss only where a graph is built or read.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import polars as pl
import scipy.sparse as sp
from threadpoolctl import threadpool_limits

from schemas.tables import CandidateSources, ModelDir, Selection
from tasks.features import Features
from tasks.workspace import write_json

BLOCK_SCORES = 2**23  # scores per block in `retrieve` (32 MiB of float32)
# users per call of the query tower: its attention's activations grow with the block, and the
# memory stays with the process (on 20,000 users at embedding 128: 2,048 took 0.25 GB, all at once 2.6 GB)
QUERY_BLOCK = 2048
NEIGHBOURS = 500  # similar items kept per item by item_similarity (co-visitation)
N_ITEMS = "n_items.npy"  # beside the retrieval SavedModel: the size of its item vocabulary
# Approximate search (retrieval.index; docs/performance.md has the measurements).
GRAPH = "items.hnsw"  # beside a retrieval SavedModel whose catalogue is searched approximately
ANN_FROM = 50_000  # retrieval.index "auto": items from which the search is approximate
GRAPH_LINKS = 32  # links per item in the graph (faiss' M)
GRAPH_BUILD_DEPTH = 40  # candidates weighed per link made (efConstruction; 80: docs/performance.md)
GRAPH_SEARCH_DEPTH = 1.25  # times the results asked for that a search keeps in view (efSearch)
GRAPH_SPARE = 32  # results asked of the graph beyond n, for the user's exclusions among them
GRAPH_BLOCK = 1024  # users per graph search (two side by side)
# The layout and inputs of a models directory. Bumped when this code can no longer score
# models an earlier version trained (2: the ranker reads candidates from two sources).
MODEL_FORMAT = 2


def retrieve(
    queries: np.ndarray,
    item_embeddings: np.ndarray,
    exclude: tuple[np.ndarray, np.ndarray],
    n: int,
    block: int | None = None,
    allowed: np.ndarray | None = None,
    graph=None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-`n` items for each query row by inner product, best first.

    `item_embeddings` row 0 is the padding item and is never returned; `exclude` holds
    (row, item) pairs that must not be returned (items the user already interacted with);
    `allowed` (a mask over the items; None = all) the only items that may be returned.
    Where fewer items qualify than `n`, the rest of a row scores -inf.

    Without `graph` the search is exact, by brute force in blocks of `block` rows. Memory
    stays bounded whatever the sizes: by default a block holds about BLOCK_SCORES scores,
    and two threads score blocks side by side (BLAS and numpy's partition release the GIL).
    BLAS itself is set to one thread, for this whole process: scores then never depend on
    how many threads BLAS has (Dask workers start with OMP_NUM_THREADS=1), so a sharded run
    writes the same numbers as a single process. With `graph` (`item_graph` of the same
    embeddings) the search is approximate: `_approximate`.
    """
    _single_threaded_blas()
    n = min(n, item_embeddings.shape[0] - 1)
    if n <= 0:
        return np.zeros((queries.shape[0], 0), np.int64), np.zeros((queries.shape[0], 0), np.float32)
    rows, items = exclude
    order = np.argsort(rows, kind="stable")
    rows, items = rows[order], items[order]
    if graph is not None:
        return _approximate(queries, item_embeddings, graph, (rows, items), n, allowed)
    block = block or max(16, BLOCK_SCORES // item_embeddings.shape[0])
    top_items = np.zeros((queries.shape[0], n), dtype=np.int64)
    top_scores = np.zeros((queries.shape[0], n), dtype=np.float32)

    def one_block(start: int) -> None:
        stop = min(start + block, queries.shape[0])
        scores = queries[start:stop] @ item_embeddings.T
        scores[:, 0] = -np.inf
        if allowed is not None:
            scores[:, ~allowed] = -np.inf
        low, high = np.searchsorted(rows, [start, stop])
        scores[rows[low:high] - start, items[low:high]] = -np.inf
        part = np.argpartition(scores, -n, axis=1)[:, -n:]
        part_scores = np.take_along_axis(scores, part, axis=1)
        ranked = np.argsort(-part_scores, axis=1, kind="stable")
        top_items[start:stop] = np.take_along_axis(part, ranked, axis=1)
        top_scores[start:stop] = np.take_along_axis(part_scores, ranked, axis=1)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(one_block, range(0, queries.shape[0], block)))
    return top_items, top_scores


def _approximate(queries: np.ndarray, item_embeddings: np.ndarray, graph, exclude: tuple[np.ndarray, np.ndarray],
                 n: int, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """`retrieve` through an HNSW graph of the items (rows of `exclude` sorted).

    Each user asks the graph for GRAPH_SPARE more results than `n`, and the excluded ones
    are dropped (few of a user's seen items are among their nearest: on the synthetic 150k
    catalogue 8 of 27 on average); `allowed` filters inside the search. A user left with
    fewer than `n` is searched exactly.
    Scores are the inner products faiss computes (equal to numpy's to float32 rounding), best
    first. The graph's search is deterministic, so sharding does not change a list."""
    import faiss

    rows, items = exclude
    width, size = item_embeddings.shape[0], min(n + GRAPH_SPARE, item_embeddings.shape[0] - 1)
    excluded = np.sort(rows.astype(np.int64) * width + items)
    top_items = np.zeros((queries.shape[0], n), np.int64)
    top_scores = np.zeros((queries.shape[0], n), np.float32)
    params = faiss.SearchParametersHNSW(efSearch=int(GRAPH_SEARCH_DEPTH * size))
    if allowed is not None:
        bitmap = np.packbits(allowed[1:], bitorder="little")
        params.sel = faiss.IDSelectorBitmap(width - 1, faiss.swig_ptr(bitmap))

    def one_block(start: int) -> np.ndarray:
        """Searches a block of users; returns those left short."""
        faiss.omp_set_num_threads(1)  # for this thread: two blocks side by side use the cores
        users = np.arange(start, min(start + GRAPH_BLOCK, queries.shape[0]))
        scores, found = graph.search(np.ascontiguousarray(queries[users], np.float32), size, params=params)
        found += 1
        usable = found > 0
        if excluded.size:
            keys = users[:, None].astype(np.int64) * width + found
            usable &= excluded[np.minimum(np.searchsorted(excluded, keys), excluded.size - 1)] != keys
        keep = usable & (np.cumsum(usable, axis=1) <= n)
        complete = keep.sum(axis=1) == n
        top_items[users[complete]] = found[complete][keep[complete]].reshape(-1, n)
        top_scores[users[complete]] = scores[complete][keep[complete]].reshape(-1, n)
        return users[~complete]

    with ThreadPoolExecutor(max_workers=2) as pool:  # faiss releases the GIL while it searches
        exact = list(pool.map(one_block, range(0, queries.shape[0], GRAPH_BLOCK)))
    redo = np.sort(np.concatenate(exact)) if exact else np.zeros(0, np.int64)
    if redo.size:
        inside = np.isin(rows, redo)
        again = retrieve(queries[redo], item_embeddings, (np.searchsorted(redo, rows[inside]), items[inside]), n,
                         allowed=allowed)
        top_items[redo], top_scores[redo] = again
    return top_items, top_scores


def approximate(index: str, n_items: int) -> bool:
    """Whether retrieval.index `index` searches a catalogue of `n_items` approximately."""
    return index == "ann" or (index == "auto" and n_items >= ANN_FROM)


def item_graph(item_embeddings: np.ndarray, parts: int = 1):
    """A faiss HNSW graph (inner product) over `item_embeddings` rows 1.. (row 0 is padding).
    Built on one thread: the same embeddings always give the same graph (faiss links items
    in a different order on several threads).

    With `parts` above 1, one graph per range of the catalogue, built side by side (each on
    one thread) and searched one after the other (`_Parts`): the build takes about 1/parts
    of the time, a search about `parts` times as long. For a graph that answers few
    searches before it is thrown away: validation's, built every epoch (at 150,000 items,
    two parts built in 6.7 s instead of 14.2 s, and found 99.5% of the exact top 50
    instead of 99.1%)."""
    import faiss

    def build(rows: np.ndarray):
        faiss.omp_set_num_threads(1)  # for this (pool) thread
        graph = faiss.IndexHNSWFlat(rows.shape[1], GRAPH_LINKS, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = GRAPH_BUILD_DEPTH
        graph.add(np.ascontiguousarray(rows, np.float32))
        return graph

    starts = [int(cut[0]) for cut in np.array_split(np.arange(item_embeddings.shape[0] - 1), parts)]
    with ThreadPoolExecutor(max_workers=parts) as pool:
        graphs = list(pool.map(build, np.split(item_embeddings[1:], starts[1:])))
    return graphs[0] if parts == 1 else _Parts(graphs, starts)


class _Parts:
    """Graphs of consecutive ranges of the catalogue, searched as one (`item_graph` with
    parts): each is asked for the `k` best, and the best `k` of all of them are kept (ties:
    the lower item). Not with an `allowed` filter: its bitmap numbers the whole catalogue."""

    def __init__(self, graphs: list, starts: list[int]):
        self.graphs, self.starts = graphs, starts

    def search(self, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
        if params is not None and params.sel is not None:
            raise ValueError("a graph in parts cannot search with an `allowed` filter")
        found = [graph.search(queries, min(k, graph.ntotal), params=params) for graph in self.graphs]
        scores = np.concatenate([part[0] for part in found], axis=1)
        labels = np.concatenate([np.where(part[1] >= 0, part[1] + start, -1)
                                 for part, start in zip(found, self.starts)], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, best, 1), np.take_along_axis(labels, best, 1)


_blas = threading.Lock()


def _single_threaded_blas() -> None:
    """Set BLAS to one thread, once per process (retrieve parallelises over blocks itself)."""
    with _blas:
        if not getattr(_single_threaded_blas, "done", False):
            threadpool_limits(1, user_api="blas")
            _single_threaded_blas.done = True


def write_graph(item_embeddings: np.ndarray, path) -> None:
    """`item_graph` of `item_embeddings`, saved beside the retrieval SavedModel at `path`."""
    import faiss

    faiss.write_index(item_graph(item_embeddings), str(path / GRAPH))


class RetrievalBundle:
    """An exported retrieval SavedModel, loaded for scoring: queries in, top-N items out."""

    def __init__(self, saved_model, item_embeddings: np.ndarray, graph=None):
        self.saved_model = saved_model
        self.item_embeddings = item_embeddings
        self.graph = graph  # `item_graph` of the item embeddings, where the model is searched approximately

    @classmethod
    def load(cls, models: ModelDir, fit_model: bool = False) -> "RetrievalBundle":
        """The served two-tower model of `models`, or with `fit_model` the one trained on the
        fit split alone (models of an earlier recflow hold only that one)."""
        from tasks.tfenv import tf

        path = models.fit_retrieval_path if fit_model and models.fit_retrieval_path.exists() else models.retrieval_path
        saved_model = tf.saved_model.load(str(path))
        n_items = int(np.load(path / N_ITEMS))
        items = saved_model.signatures["candidates"](tf.range(n_items + 1, dtype=tf.int32))["embedding"].numpy()
        graph = None
        if (path / GRAPH).exists():
            import faiss

            graph = faiss.read_index(str(path / GRAPH))
        return cls(saved_model, items, graph)

    @property
    def history_length(self) -> int:
        return int(self.saved_model.signatures["query"].structured_input_signature[1]["history"].shape[1])

    def queries(self, user_idx: np.ndarray, history: np.ndarray) -> np.ndarray:
        signature = self.saved_model.signatures["query"]
        return query_blocks(lambda users, recent: signature(user_idx=users, history=recent)["embedding"].numpy(),
                            user_idx, history, self.item_embeddings.shape[1])

    def retrieve(
        self, user_idx: np.ndarray, history: np.ndarray, exclude: tuple[np.ndarray, np.ndarray], n: int,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        return retrieve(self.queries(user_idx, history), self.item_embeddings, exclude, n, allowed=allowed,
                        graph=self.graph)


def query_blocks(query: Callable[[np.ndarray, np.ndarray], np.ndarray], user_idx: np.ndarray, history: np.ndarray,
                 dim: int) -> np.ndarray:
    """`query` (user ids and histories to query embeddings of `dim`) over blocks of
    QUERY_BLOCK users."""
    parts = [query(user_idx[i : i + QUERY_BLOCK].astype(np.int32), history[i : i + QUERY_BLOCK].astype(np.int32))
             for i in range(0, user_idx.size, QUERY_BLOCK)]
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)


def rows_of(users: np.ndarray, events: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(row in `users`, item) for the events of the users listed in sorted `users`."""
    event_users = events["user_idx"].to_numpy()
    row = np.minimum(np.searchsorted(users, event_users), max(users.size - 1, 0))
    known = users[row] == event_users if users.size else np.zeros(event_users.size, bool)
    return row[known], events["item_idx"].to_numpy()[known]


def as_table(users: np.ndarray, top: np.ndarray) -> pl.DataFrame:
    k = top.shape[1]
    return pl.DataFrame(
        {
            "user": np.repeat(users, k),
            "item": top.ravel(),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int32), users.size),
        }
    )


def save_settings(models: ModelDir, selection: Selection) -> None:
    """Record beside the models how they are used: the model format, and the selection of
    the candidate sources their ranker is trained on (scoring draws candidates the same
    way)."""
    payload = {"format": MODEL_FORMAT, "selection": selection.model_dump(mode="json", exclude={"reused", "seconds"})}
    write_json(payload, models.settings)


def read_selection(models: ModelDir) -> Selection | None:
    """The selection recorded with `models`, or None when this code cannot score them
    (models of an earlier format)."""
    try:
        settings = json.loads(models.settings.read_text())
    except (OSError, ValueError):
        return None
    return Selection.model_validate(settings["selection"]) if settings.get("format") == MODEL_FORMAT else None


def candidate_settings(models: ModelDir) -> CandidateSources | None:
    """The candidate sources of `models`, or None when this code cannot score them."""
    selection = read_selection(models)
    return selection.sources if selection else None


def model_user_map(models: ModelDir, features: Features) -> np.ndarray:
    """Tonight's user_idx -> the models' user_idx (0 for users the models never saw)."""
    return index_map(features.users, pl.read_parquet(models.users), "user_id", "user_idx")


def model_item_map(models: ModelDir, features: Features) -> np.ndarray:
    """Tonight's item_idx -> the models' item_idx (0 for items the models never saw)."""
    return index_map(features.items, pl.read_parquet(models.items), "item_id", "item_idx")


def index_map(tonight: pl.DataFrame, model_vocab: pl.DataFrame, id_column: str, idx_column: str) -> np.ndarray:
    """Array mapping tonight's index -> the model's index (0 where the model never saw the id)."""
    joined = tonight.select(id_column, idx_column).join(
        model_vocab.select(id_column, pl.col(idx_column).alias("model_idx")), on=id_column, how="left"
    )
    mapping = np.zeros(tonight.height + 1, dtype=np.int32)
    mapping[joined[idx_column].to_numpy()] = joined["model_idx"].fill_null(0).to_numpy()
    return mapping


def item_similarity(
    users: np.ndarray, items: np.ndarray, n_items: int, shrink: float = 10.0, asymmetry: float = 0.5,
    neighbours: int = NEIGHBOURS, block: int | None = None,
) -> sp.csr_matrix:
    """Item-item similarity of co-occurrence in user histories, keeping each item's
    `neighbours` most similar items: the classical collaborative signal (item-kNN) behind
    co-visitation candidates.

    similarity(i, j) = together(i, j) / (n_i ** asymmetry * n_j ** (1 - asymmetry) + shrink),
    with together(i, j) the users who have both items and n_i those who have i. Row i is
    a history item, column j a candidate; asymmetry 0.5 is cosine, larger values discount
    popular history items more and popular candidates less; `shrink` pulls pairs seen
    together by few users towards zero. Computed sparse, `block` items at a time (by default
    rows of about 4M possible similarities, two blocks at once), so memory stays flat
    whatever the catalogue size. Row and column 0 (padding / unknown) stay empty.
    """
    return item_similarities(users, items, n_items, [(shrink, asymmetry)], neighbours, block)[0]


def item_similarities(
    users: np.ndarray, items: np.ndarray, n_items: int, settings: list[tuple[float, float]],
    neighbours: int = NEIGHBOURS, block: int | None = None,
) -> list[sp.csr_matrix]:
    """`item_similarity` for each (shrink, asymmetry) of `settings`, in one pass: the
    co-occurrence counts, most of the cost, are computed once per block of items and shared.
    Two threads work on blocks side by side (scipy's product and numpy release the GIL);
    the blocks are joined in order, so the result does not depend on the threads."""
    block = block or max(16, 2**22 // (n_items + 1))
    keep = items > 0
    matrix = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (users[keep], items[keep])),
        shape=(int(users.max(initial=0)) + 1, n_items + 1),
    )
    matrix.data[:] = 1.0  # repeated events count once
    by_item = matrix.T.tocsr()
    counts = np.asarray(matrix.sum(axis=0)).ravel()

    def one_block(start: int) -> list[tuple]:
        """Per setting: the entries kept in each row of the block, and their columns and values
        (in CSR order: rows ascending, columns ascending within a row)."""
        # Columns ascending within each row, for the ties below: two linear passes (to CSC and
        # back) rather than a sort of each row (these rows run to 100,000 items: twice as fast).
        together = (by_item[start : start + block] @ matrix).tocsc().tocsr().tocoo()
        rows, columns = together.row + start, together.col
        off_diagonal = rows != columns
        rows, columns, shared = rows[off_diagonal], columns[off_diagonal], together.data[off_diagonal]
        layout = _Rows(rows, neighbours)
        found = []
        for shrink, asymmetry in settings:
            values = shared / np.maximum((counts**asymmetry)[rows] * (counts ** (1 - asymmetry))[columns] + shrink,
                                         1e-12)
            keep = layout.strongest(values)
            found.append((np.bincount(rows[keep] - start, minlength=together.shape[0]), columns[keep],
                          values[keep].astype(np.float32, copy=False)))
        return found

    with ThreadPoolExecutor(max_workers=2) as pool:
        blocks = list(pool.map(one_block, range(0, n_items + 1, block)))
    similarities = []
    for at in range(len(settings)):
        found = [block[at] for block in blocks]  # built as CSR directly: a COO matrix would copy every triple twice
        similarity = sp.csr_matrix(
            (np.concatenate([values for _, _, values in found]), np.concatenate([columns for _, columns, _ in found]),
             np.concatenate([[0], np.cumsum(np.concatenate([per_row for per_row, _, _ in found]))])),
            shape=(n_items + 1, n_items + 1),
        )
        similarity.eliminate_zeros()
        similarities.append(similarity)
    return similarities


class _Rows:
    """Where the triples of one block of `item_similarity` sit: rows come in order with
    columns ascending within a row. A partition of each row longer than `width`, not a
    sort, finds that row's `width`-th largest value."""

    def __init__(self, rows: np.ndarray, width: int):
        starts = np.flatnonzero(np.r_[True, rows[1:] != rows[:-1]]) if rows.size else np.zeros(0, np.int64)
        lengths = np.diff(np.r_[starts, rows.size])
        long_rows = lengths > width
        self.width, self.long = width, np.flatnonzero(np.repeat(long_rows, lengths))
        self.row = np.repeat(np.cumsum(long_rows) - 1, lengths)[self.long]  # among the long rows
        self.first = np.r_[0, np.cumsum(lengths[long_rows])]  # each long row's triples in `long`: first to next

    def strongest(self, values: np.ndarray) -> np.ndarray:
        """Which triples to keep: each row's `width` largest positive `values` (ties: the lower
        columns)."""
        keep = np.ones(values.size, bool)
        if not self.long.size:
            return keep
        long = values[self.long]
        threshold = -np.array([np.partition(-long[first:stop], self.width - 1)[self.width - 1]
                               for first, stop in zip(self.first[:-1], self.first[1:])], np.float32)[self.row]
        above, tie = long > threshold, long == threshold
        room = self.width - np.bincount(self.row[above], minlength=self.first.size - 1)[self.row]
        ties_before = np.cumsum(tie) - tie
        keep[self.long] = above | (tie & (ties_before - ties_before[self.first[:-1]][self.row] < room))
        return keep
