"""Ranking: a TFRS model that orders each user's candidates.

Sixth stage of the nightly DAG, after the selection. For each user with `valid` events it draws candidates
from both sources (tasks/candidates.py: the two-tower model and co-visitation, from the
`fit` history, as at serving time) and learns which of them the user really picked next:
positives are the candidates among the user's `valid` items, negatives the other
candidates (hard negatives from the sources' own lists), with a listwise softmax loss over
each user's list, as the top-K metrics judge it. So it learns how to blend the sources
on this data. Features: both sources' scores, the rank in its source, item popularity,
the user's activity (and, optionally, user and item id embeddings); DCN-v2 cross layers
model their interactions. How long to train, and whether to discount popularity, are
chosen by two-fold cross-fitting over the lists (`_train`); the probe rankers of the
cross-fitting stay in the exported ranker, which scores the mean logit of the final ranker
and the two probes.
Exported as a SavedModel with one `score` signature, beside the retrieval model; the stage
then publishes the whole models directory.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import polars as pl
import scipy.sparse as sp

from schemas.config import RankingConfig, Run
from schemas.tables import CandidateSources, FeatureSet, ModelDir, ModelSet, Selection, TrainedModel
from tasks.candidates import FEATURES, generate
from tasks.features import Features, load_features, user_histories
from tasks.inference import RetrievalBundle, rows_of
from tasks.stage import stage
from tasks.workspace import publish_dir, reuse, stamp

log = logging.getLogger(__name__)

CUTOFF = 10
CLEARLY_BETTER = 2.0  # paired t statistic over the cross-fitted lists a discount needs to replace the default
LISTS_PER_CALL = 256  # candidate lists per call of the ranker outside training (_scores)


def train_ranking(run: Run, features: FeatureSet, retrieval: TrainedModel, selection: Selection) -> ModelSet:
    """Train the ranker on the candidates of `valid` users (drawn as `selection` chose),
    beside the retrieval model, and publish both as models/<key>/ (or reuse them, as the
    retrieval stage did)."""
    target = ModelDir.of(run.workspace, retrieval.key)
    if (found := reuse(target.path, retrieval.key, ModelSet)) is not None:
        return found
    staging = ModelDir(path=retrieval.path.parent)
    ranking = _train(load_features(features.path), staging, run.config.ranking, selection.sources, run.config.seed)
    staging.fit_similarity.unlink()
    models = ModelSet(
        path=target.path, key=retrieval.key,
        retrieval=retrieval.model_copy(update={"path": target.retrieval_path}),
        ranking=ranking.model_copy(update={"path": target.ranking_path}),
    )
    stamp(staging.path, models)
    publish_dir(staging.path, target.path)
    return models


def _train(
    features: Features, models: ModelDir, cfg: RankingConfig, sources: CandidateSources, seed: int
) -> TrainedModel:
    """Train the ranker on the candidates of the users with `valid` events (two-tower model
    in `models`, co-visitation of the `fit` events through the similarity the selection
    stored there); export it there."""
    from tasks import towers
    from tasks.tfenv import keras, seed_everything, tf

    started = time.perf_counter()
    seed_everything(seed)
    fit = features.events.filter(pl.col("split") == "fit")
    valid = features.events.filter(pl.col("split") == "valid")
    users = features.sampled(np.unique(valid["user_idx"].to_numpy())).astype(np.int32)
    bundle = RetrievalBundle.load(models, fit_model=True)
    recent = user_histories(fit, features.n_users, bundle.history_length)[users]
    activity = np.bincount(fit["user_idx"].to_numpy(), minlength=features.n_users + 1)[users]
    similarity = sp.load_npz(models.fit_similarity)  # the selection's, computed with `sources`
    found = generate(bundle.queries(users, recent), bundle.item_embeddings, recent, similarity, rows_of(users, fit),
                     features.item_popularity, activity, sources, graph=bundle.graph)
    picked = valid.select(pl.col("user_idx").alias("user"), pl.col("item_idx").alias("item"),
                          pl.lit(1.0).alias("label"))
    labels = (
        pl.DataFrame({"user": np.repeat(users, found.items.shape[1]), "item": found.items.ravel()})
        .join(picked, on=["user", "item"], how="left")["label"]
        .fill_null(0.0)
        .to_numpy()
        .reshape(found.items.shape)
    ) * found.real
    # One example per user: its candidate list, with the picked items sharing a target mass of one.
    keep = np.flatnonzero(labels.sum(axis=1) > 0)
    every = {"user_idx": users, "item_idx": found.items.astype(np.int32), "numeric": found.numeric, "real": found.real}
    targets = (labels / np.maximum(labels.sum(axis=1, keepdims=True), 1)).astype(np.float32)

    def ranker():
        model = towers.Ranker(features, cfg, popularity_feature=FEATURES.index("log_item_popularity"))
        model.compile(optimizer=towers.RowSparseAdam(cfg.learning_rate, model.penalties()))
        model.adapt(found.numeric[found.real] if found.real.any() else found.numeric.reshape(-1, len(FEATURES)))
        return model

    def batches(rows):
        lists = {name: values[rows] for name, values in every.items()}
        return tf.data.Dataset.from_tensor_slices((lists, targets[rows])).shuffle(rows.size, seed=seed).batch(
            cfg.batch_size)

    # Two-fold cross-fitting: a probe ranker trains on each (seeded) half of the lists for as
    # long as its loss on the other half falls (at most max_epochs); every list then has scores
    # from a ranker that never saw it, and those choose the epochs and the popularity discount.
    # The probes are kept: the exported ranker averages them with the final one (with a few
    # thousand lists, one ranker's order moves with its seed; the mean of three moves less).
    half = np.random.default_rng(seed).random(keep.size) < 0.5
    folds = [(keep[half], keep[~half]), (keep[~half], keep[half])]
    history: dict[str, list[float]] = {}
    epochs, discount, checks, best_losses, probes = 0, 0.0, {}, [], []
    if all(train.size and check.size for train, check in folds):
        unseen = np.zeros(found.items.shape, dtype=np.float32)
        for fold, (train, check) in enumerate(folds, start=1):
            checked = {name: values[check] for name, values in every.items()}
            monitor = towers.EpochMetric("held_out_loss", lambda model: _list_loss(model, checked, targets[check]))
            stopper = keras.callbacks.EarlyStopping(monitor="held_out_loss", patience=cfg.patience,
                                                    restore_best_weights=True)
            probe = ranker()
            losses = probe.fit(batches(train), epochs=cfg.max_epochs, callbacks=[monitor, stopper],
                               verbose=0).history["held_out_loss"]
            history[f"held-out loss, fold {fold}"] = losses
            best_losses.append(min(losses))
            epochs += (int(np.argmin(losses)) + 1) / len(folds)
            unseen[check] = _scores(probe, checked)
            probes.append(probe)
        epochs = max(1, round(epochs))
        popularity = found.numeric[keep][..., FEATURES.index("log_item_popularity")]
        discount, checks = _discount(unseen[keep], popularity, found.real[keep], labels[keep],
                                     cfg.popularity_discounts)
    model = ranker()
    if epochs:  # then a final ranker trains on every list, for that many epochs; all three get that discount
        model.fit(batches(keep), epochs=epochs, verbose=0)
        for each in (model, *probes):
            each.popularity_discount.assign(discount)
    else:  # tiny data: too few users picked a candidate; an untrained ranker keeps the two-tower order
        log.warning("ranking: %d validation pick(s) among the candidates, too few to train on; the ranker keeps "
                    "the two-tower order", keep.size)
    model.export(models.ranking_path, probes)
    metrics = {
        "held_out_loss": float(np.mean(best_losses)) if best_losses else float("nan"),
        f"held_out_ndcg_at_{CUTOFF}": checks.get(discount, float("nan")),
        "popularity_discount": discount,
        "positive_rate": float(labels.sum() / max(found.real.sum(), 1)),
        "candidate_recall": float(labels.sum() / max(picked.filter(pl.col("user").is_in(users.tolist())).height, 1)),
    }
    log.info("ranking: %d lists of %d candidates, %d epochs, %s", keep.size, found.items.shape[1], epochs, metrics)
    return TrainedModel(
        path=models.ranking_path, epochs=epochs, seconds=time.perf_counter() - started, metrics=metrics,
        history={name: [float(v) for v in values] for name, values in history.items()},
    )


def _discount(logits: np.ndarray, popularity: np.ndarray, real: np.ndarray, labels: np.ndarray,
              discounts: list[float]) -> tuple[float, dict[float, float]]:
    """The popularity discount to keep, and each one's NDCG@CUTOFF over the lists, scored by
    `logits` from rankers that did not train on them.

    The first of `discounts` is the default; another replaces it only when it ranks the
    picks clearly better, list by list (a paired t statistic of at least CLEARLY_BETTER),
    and better than any other such: with a few thousand lists, small differences are noise.
    """
    per_list = {value: _list_ndcg(logits - value * popularity, real, labels) for value in discounts}
    chosen, evidence = discounts[0], {}
    for value in discounts[1:]:
        gain = per_list[value] - per_list[discounts[0]]
        spread = gain.std(ddof=1) / np.sqrt(gain.size) if gain.size > 1 else 0.0
        evidence[value] = float(gain.mean() / spread) if spread > 0 else 0.0
        if evidence[value] >= CLEARLY_BETTER and per_list[value].mean() > per_list[chosen].mean():
            chosen = value
    log.info("ranking: popularity discount %g; NDCG@%d of each on %d unseen lists %s, paired t against %g %s", chosen,
             CUTOFF, labels.shape[0], {v: round(float(n.mean()), 4) for v, n in per_list.items()}, discounts[0],
             {v: round(t, 2) for v, t in evidence.items()})
    return chosen, {value: float(ndcg.mean()) for value, ndcg in per_list.items()}


def _list_ndcg(logits: np.ndarray, real: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """NDCG@CUTOFF of each list ordered by `logits`, `labels` marking its picked candidates."""
    top = np.argsort(-np.where(real, logits, -np.inf), axis=1, kind="stable")[:, :CUTOFF]
    gain = 1.0 / np.log2(np.arange(2, CUTOFF + 2))
    dcg = (np.take_along_axis(labels > 0, top, axis=1) * gain).sum(axis=1)
    ideal = np.cumsum(gain)[np.minimum((labels > 0).sum(axis=1), CUTOFF) - 1]
    return dcg / ideal


def _scores(model, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """The ranker's logits for the lists in `inputs`, LISTS_PER_CALL lists at a time: its
    activations grow with the lists of a call, and the memory stays with the process (10,000
    lists of 300 candidates at once took 2.6 GB)."""
    parts = [model({name: values[i : i + LISTS_PER_CALL] for name, values in inputs.items()}).numpy()
             for i in range(0, len(inputs["user_idx"]), LISTS_PER_CALL)]
    return np.concatenate(parts) if parts else np.zeros(inputs["item_idx"].shape, np.float32)


def _list_loss(model, inputs: dict[str, np.ndarray], targets: np.ndarray) -> float:
    """The listwise loss of `model` on the lists in `inputs`, averaged over all of them (the
    loss Keras logs for an epoch is its last batch's)."""
    logits = np.where(inputs["real"], _scores(model, inputs).astype(np.float64), -np.inf)
    top = logits.max(axis=1, keepdims=True)
    log_softmax = logits - top - np.log(np.exp(logits - top).sum(axis=1, keepdims=True))
    return float(-(targets * np.where(inputs["real"], log_softmax, 0.0)).sum(axis=1).mean())


train_ranking_task = stage("train_ranking", train_ranking)
