"""Ranking: a TFRS model that re-orders the retrieval model's candidates.

Fifth stage of the nightly DAG. For each user with `valid` events it takes the retrieval
model's top-N candidates (querying with the `fit` history, as at serving time) and learns
which of them the user really picked next: positives are the candidates among the user's
`valid` items, negatives the other candidates (hard negatives from the model's own list),
with a listwise softmax loss over each user's list, as the top-K metrics judge it.
Features: the retrieval score and rank, item popularity, the user's activity and the
candidate's recency-weighted co-occurrence with the user's history (and, optionally, user
and item id embeddings); DCN-v2 cross layers model their interactions.
Exported as a SavedModel with one `score` signature, beside the retrieval model; the stage
then publishes the whole models directory.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import polars as pl

from schemas.config import RankingConfig, Run
from schemas.tables import FeatureSet, ModelDir, ModelSet, TrainedModel
from tasks.features import Features, load_features, user_histories
from tasks.inference import RetrievalBundle, candidate_features, cooccurrence, item_similarity, rows_of
from tasks.stage import stage
from tasks.workspace import publish_dir, reuse, stamp

log = logging.getLogger(__name__)


def train_ranking(run: Run, features: FeatureSet, retrieval: TrainedModel) -> ModelSet:
    """Train the ranker on the retrieval model's candidates for `valid` users, beside the
    retrieval model, and publish both as models/<key>/ (or reuse them, as the retrieval
    stage did)."""
    target = ModelDir.of(run.workspace, retrieval.key)
    if (found := reuse(target.path, retrieval.key, ModelSet)) is not None:
        return found
    staging = ModelDir(path=retrieval.path.parent)
    ranking = _train(load_features(features.path), staging, run.config.ranking, run.config.retrieval.candidates,
                     run.config.seed)
    models = ModelSet(
        path=target.path, key=retrieval.key,
        retrieval=retrieval.model_copy(update={"path": target.retrieval_path}),
        ranking=ranking.model_copy(update={"path": target.ranking_path}),
    )
    stamp(staging.path, models)
    publish_dir(staging.path, target.path)
    return models


def _train(features: Features, models: ModelDir, cfg: RankingConfig, n_candidates: int, seed: int) -> TrainedModel:
    """Train the ranker on the candidates of the retrieval model in `models`; export it there."""
    from tasks import towers
    from tasks.tfenv import keras, seed_everything, tf

    started = time.perf_counter()
    seed_everything(seed)
    fit = features.events.filter(pl.col("split") == "fit")
    valid = features.events.filter(pl.col("split") == "valid")
    users = features.sampled(np.unique(valid["user_idx"].to_numpy())).astype(np.int32)
    bundle = RetrievalBundle.load(models)
    recent = user_histories(fit, features.n_users, bundle.history_length)[users]
    candidates, scores = bundle.retrieve(users, recent, rows_of(users, fit), n_candidates)
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
    model.export(models.ranking_path)
    metrics = {"train_loss": losses[-1] if losses else float("nan"), "positive_rate": float(labels.mean())}
    log.info("ranking: %d examples, %s", labels.size, metrics)
    return TrainedModel(
        path=models.ranking_path, epochs=cfg.epochs if losses else 0, seconds=time.perf_counter() - started,
        metrics=metrics,
        history={"train loss": losses},
    )


train_ranking_task = stage("train_ranking", train_ranking)
