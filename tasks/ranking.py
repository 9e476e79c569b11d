"""Ranking: a TFRS model that re-orders the retrieval model's candidates.

Fifth stage of the nightly DAG. For each user with `valid` events it takes the retrieval
model's top-N candidates (querying with the `fit` history, as at serving time) and learns
which of them the user really picked next: positives are the candidates among the user's
`valid` items, negatives the other candidates (hard negatives from the model's own list),
with a listwise softmax loss over each user's list, as the top-K metrics judge it.
Features: the retrieval score and rank, item popularity, the user's activity and the
candidate's recency-weighted co-occurrence with the user's history (and, optionally, user
and item id embeddings); DCN-v2 cross layers model their interactions.
Exported as a SavedModel with one `score` signature.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
import scipy.sparse as sp
from prefect import task

from schemas.config import RankingConfig, RetrievalConfig
from schemas.tables import FeatureSet, TrainedModel
from tasks.features import load_features, user_histories
from tasks.retrieval import RetrievalBundle, rows_of

log = logging.getLogger(__name__)

NEIGHBOURS = 500  # similar items kept per item for the co-occurrence feature


def train_ranking(
    feature_set: FeatureSet,
    retrieval_path: Path,
    out: Path,
    cfg: RankingConfig,
    retrieval_cfg: RetrievalConfig,
    seed: int,
) -> TrainedModel:
    """Train the ranker on retrieval candidates of `valid` users and export it to `out`."""
    from tasks import towers
    from tasks.tfenv import keras, seed_everything, tf

    started = time.perf_counter()
    seed_everything(seed)
    features = load_features(feature_set.path)
    fit = features.events.filter(pl.col("split") == "fit")
    valid = features.events.filter(pl.col("split") == "valid")
    users = features.sampled(np.unique(valid["user_idx"].to_numpy())).astype(np.int32)
    bundle = RetrievalBundle.load(retrieval_path)
    recent = user_histories(fit, features.n_users, bundle.history_length)[users]
    candidates, scores = bundle.retrieve(users, recent, rows_of(users, fit), retrieval_cfg.candidates)
    activity = np.bincount(fit["user_idx"].to_numpy(), minlength=features.n_users + 1)[users]
    similarity = item_similarity(fit["user_idx"].to_numpy(), fit["item_idx"].to_numpy(), features.n_items)
    together = cooccurrence(similarity, recent, candidates)
    inputs = candidate_features(users, candidates, scores, features.item_popularity, activity, together)
    picked = valid.select(pl.col("user_idx").alias("user"), pl.col("item_idx").alias("item"), pl.lit(1.0).alias("label"))
    labels = (
        pl.DataFrame({"user": inputs["user_idx"], "item": inputs["item_idx"]})
        .join(picked, on=["user", "item"], how="left")["label"]
        .fill_null(0.0)
        .to_numpy()
        .reshape(candidates.shape)
    )
    # One example per user: its candidate list, with the picked items sharing a target mass of one.
    keep = labels.sum(axis=1) > 0
    every = {"user_idx": users, "item_idx": candidates.astype(np.int32),
             "numeric": inputs["numeric"].reshape(*candidates.shape, -1)}
    lists = {name: values[keep] for name, values in every.items()}
    targets = (labels[keep] / labels[keep].sum(axis=1, keepdims=True)).astype(np.float32)
    model = towers.Ranker(features, cfg)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    losses: list[float] = []
    if keep.any():
        model.adapt(lists)
        dataset = tf.data.Dataset.from_tensor_slices((lists, targets)).shuffle(int(keep.sum()), seed=seed).batch(cfg.batch_size)
        losses = [float(v) for v in model.fit(dataset, epochs=cfg.epochs, verbose=0).history["loss"]]
    else:  # tiny data: no user picked a candidate; an untrained ranker keeps the retrieval order
        log.warning("ranking: no validation pick among the candidates; the ranker keeps the retrieval order")
        model.adapt(every)
    model.export(out)
    metrics = {"train_loss": losses[-1] if losses else float("nan"), "positive_rate": float(labels.mean())}
    log.info("ranking: %d examples, %s", labels.size, metrics)
    return TrainedModel(
        path=out, epochs=cfg.epochs if losses else 0, seconds=time.perf_counter() - started, metrics=metrics,
        history={"train loss": losses},
    )


def candidate_features(
    user_idx: np.ndarray,
    candidates: np.ndarray,
    scores: np.ndarray,
    item_popularity: np.ndarray,
    activity: np.ndarray,
    together: np.ndarray,
) -> dict[str, np.ndarray]:
    """The ranker's inputs for each (user, candidate) pair, flattened row-major.

    `candidates`, `scores` and `together` (co-occurrence with the user's recent history)
    are (users x N); `activity` is each user's number of history events; `item_popularity`
    is indexed by item.
    """
    n = candidates.shape[1]
    return {
        "user_idx": np.repeat(user_idx, n).astype(np.int32),
        "item_idx": candidates.ravel().astype(np.int32),
        "numeric": np.stack(
            [
                scores.ravel(),
                np.log1p(np.tile(np.arange(n), user_idx.size)),
                np.log1p(item_popularity[candidates.ravel()]),
                np.log1p(np.repeat(activity, n)),
                together.ravel(),
            ],
            axis=1,
        ).astype(np.float32),
    }


def item_similarity(
    users: np.ndarray, items: np.ndarray, n_items: int, shrink: float = 10.0, neighbours: int = NEIGHBOURS,
    block: int | None = None,
) -> sp.csr_matrix:
    """Item-item cosine similarity of co-occurrence in user histories, shrunk towards zero,
    keeping each item's `neighbours` most similar items.

    A classical collaborative signal (item-kNN) the ranker gets as a feature. Computed
    `block` items at a time (by default about 4M similarities: 16 MiB, plus the partition's
    int64 indices), so memory stays flat whatever the catalogue size. Row and column 0
    (padding / unknown) stay empty.
    """
    block = block or max(16, 2**22 // (n_items + 1))
    keep = items > 0
    matrix = sp.csr_matrix(
        (np.ones(int(keep.sum()), np.float32), (users[keep], items[keep])),
        shape=(int(users.max(initial=0)) + 1, n_items + 1),
    )
    matrix.data[:] = 1.0  # repeated events count once
    by_item = matrix.T.tocsr()
    norms = np.sqrt(np.asarray(matrix.sum(axis=0)).ravel())
    width = min(neighbours, n_items + 1)
    rows, columns, values = [], [], []
    for start in range(0, n_items + 1, block):
        stop = min(start + block, n_items + 1)
        together = (by_item[start:stop] @ matrix).toarray()
        together[np.arange(stop - start), np.arange(start, stop)] = 0.0
        together /= norms[start:stop, None] * norms[None, :] + shrink
        top = np.argpartition(together, -width, axis=1)[:, -width:]
        rows.append(np.repeat(np.arange(start, stop), width))
        columns.append(top.ravel())
        values.append(np.take_along_axis(together, top, axis=1).ravel())
    similarity = sp.csr_matrix(
        (np.concatenate(values), (np.concatenate(rows), np.concatenate(columns))), shape=(n_items + 1, n_items + 1)
    )
    similarity.eliminate_zeros()
    return similarity


def cooccurrence(
    similarity: sp.csr_matrix, recent: np.ndarray, candidates: np.ndarray, half_life: float = 5.0, block: int = 1024
) -> np.ndarray:
    """Recency-weighted similarity of each candidate to the user's history (newest first).

    An item's weight halves every `half_life` later events, as in recency-weighted EASE.
    """
    weights = np.power(0.5, np.arange(recent.shape[1]) / half_life).astype(np.float32)
    result = np.zeros(candidates.shape, dtype=np.float32)
    for start in range(0, recent.shape[0], block):
        chunk = recent[start : start + block]
        rows, positions = np.nonzero(chunk)
        history = sp.csr_matrix(
            (weights[positions], (rows, chunk[rows, positions])), shape=(chunk.shape[0], similarity.shape[0])
        )
        scores = (history @ similarity).toarray()
        result[start : start + block] = np.take_along_axis(scores, candidates[start : start + block], axis=1)
    return result


@task(name="train_ranking")
def train_ranking_task(
    feature_set: FeatureSet,
    retrieval_path: Path,
    out: Path,
    cfg: RankingConfig,
    retrieval_cfg: RetrievalConfig,
    seed: int,
) -> TrainedModel:
    return train_ranking(feature_set, retrieval_path, out, cfg, retrieval_cfg, seed)
