"""Ranking: a TFRS model that re-orders the retrieval model's candidates.

Fifth stage of the nightly DAG. For each user with `valid` events it takes the retrieval
model's top-N candidates (querying with the `fit` history, as at serving time) and learns
which of them the user really picked next: positives are the candidates among the user's
`valid` items, negatives the other candidates (hard negatives from the model's own list),
with a listwise softmax loss over each user's list, as the top-K metrics judge it.
Features: the retrieval score and rank, item popularity and the user's activity (and,
optionally, user and item id embeddings); DCN-v2 cross layers model their interactions.
Exported as a SavedModel with one `score` signature.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import polars as pl
from prefect import task

from schemas.config import RankingConfig, RetrievalConfig
from schemas.tables import FeatureSet, TrainedModel
from tasks.features import load_features, user_histories
from tasks.retrieval import RetrievalBundle, rows_of

log = logging.getLogger(__name__)


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
    users = np.unique(valid["user_idx"].to_numpy()).astype(np.int32)
    bundle = RetrievalBundle.load(retrieval_path)
    recent = user_histories(fit, features.n_users, bundle.history_length)[users]
    candidates, scores = bundle.retrieve(users, recent, rows_of(users, fit), retrieval_cfg.candidates)
    activity = np.bincount(fit["user_idx"].to_numpy(), minlength=features.n_users + 1)[users]
    inputs = candidate_features(users, candidates, scores, features.item_popularity, activity)
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
    lists = {
        "user_idx": users[keep],
        "item_idx": candidates[keep].astype(np.int32),
        "numeric": inputs["numeric"].reshape(*candidates.shape, -1)[keep],
    }
    targets = (labels[keep] / labels[keep].sum(axis=1, keepdims=True)).astype(np.float32)
    model = towers.Ranker(features, cfg)
    model.adapt(lists)
    model.compile(optimizer=keras.optimizers.Adam(cfg.learning_rate))
    dataset = tf.data.Dataset.from_tensor_slices((lists, targets)).shuffle(int(keep.sum()), seed=seed).batch(cfg.batch_size)
    history = model.fit(dataset, epochs=cfg.epochs, verbose=0)
    model.export(out)
    metrics = {"train_loss": float(history.history["loss"][-1]), "positive_rate": float(labels.mean())}
    log.info("ranking: %d examples, %s", labels.size, metrics)
    return TrainedModel(path=out, epochs=cfg.epochs, seconds=time.perf_counter() - started, metrics=metrics)


def candidate_features(
    user_idx: np.ndarray, candidates: np.ndarray, scores: np.ndarray, item_popularity: np.ndarray, activity: np.ndarray
) -> dict[str, np.ndarray]:
    """The ranker's inputs for each (user, candidate) pair, flattened row-major.

    `candidates` and `scores` are (users x N) from retrieval; `activity` is each user's
    number of history events; `item_popularity` is indexed by item.
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
            ],
            axis=1,
        ).astype(np.float32),
    }


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
