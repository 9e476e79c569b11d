"""Evaluation: metrics on the held-out split, the registry and the champion gate.

Seventh stage of the nightly DAG. It scores popularity, retrieval alone and retrieval +
ranking on each user's latest (`test`) events with the metric functions the benchmarks
use (tasks/metrics.py), logs the results and tonight's models as an MLflow model (the
recommender, tasks/serving.py) to tonight's MLflow run, registers it,
and promotes them to `champion` only when they beat the current champion on NDCG@10 on
the same held-out data.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import polars as pl

from schemas.config import ListConfig, Run
from schemas.tables import ChampionDecision, FeatureSet, ModelDir, ModelSet
from tasks import privacy, tracking
from tasks.features import Features, load_features, user_histories
from tasks.inference import RetrievalBundle, as_table, candidate_settings, retrieve, rows_of
from tasks.lists import recommend, servable_items
from tasks.metrics import list_metrics, ranking_metrics
from tasks.stage import stage
from tasks.workspace import stage_key, write_json

log = logging.getLogger(__name__)

CUTOFF = 10
CURVE = (1, 5, 10, 20, 50)  # cut-offs of the recall@K curve


def evaluate(run: Run, features: FeatureSet, models: ModelSet, run_id: str) -> ChampionDecision:
    """Score tonight's models (and the champion) on the test split; log, register, decide.

    A champion that may have learned from a user now on the deletion list is retired:
    tonight's models replace it whatever their metrics.
    """
    lists = run.config.lists
    results = heldout_metrics(models, features, lists=lists)
    tracking.log_recommender(run.workspace, run_id, models, features.path, run.config)
    flat = {f"{tracking.METRIC_PREFIX[name]}{metric}_at_{CUTOFF}": value for name, values in results.items()
            if name != "curve" for metric, value in values.items()}
    champion = tracking.champion(run.workspace)
    new_ndcg = results["retrieval+ranking"]["ndcg"]
    if champion is not None and champion[1].path == models.path:
        promote, version = False, str(champion[0].version)
        reason = f"tonight's models are champion v{version} already (same input, config and code)"
        flat |= {f"champion_{m}_at_{CUTOFF}": v for m, v in results["retrieval+ranking"].items()}
    else:
        version = tracking.register(run.workspace, run_id, models.key)
        if champion is None:
            promote, reason = True, "no champion yet"
        elif candidate_settings(champion[1]) is None:
            promote = True
            reason = (f"champion v{champion[0].version} was trained by an earlier recflow whose models this one "
                      "cannot score: retired")
        elif privacy.remembers(champion[1], run.config.privacy, run.workspace):
            promote = True
            reason = f"champion v{champion[0].version} was trained with users now on the deletion list: retired"
        else:
            held = heldout_metrics(champion[1], features, baselines=False, lists=lists)
            held = held["retrieval+ranking"]
            flat |= {f"champion_{m}_at_{CUTOFF}": v for m, v in held.items()}
            promote = new_ndcg > held["ndcg"]
            reason = (
                f"NDCG@{CUTOFF} {new_ndcg:.4f} {'beats' if promote else 'does not beat'} "
                f"champion v{champion[0].version} ({held['ndcg']:.4f})"
            )
    if champion is None or champion[1].path != models.path:  # tonight registered a version: say why it won or lost
        tracking.tag_version(run.workspace, version, {"champion_decision": reason, "promoted": str(promote).lower()})
    if promote:
        tracking.promote(run.workspace, version)
        scoring = (run_id, version, models.path)
    else:
        scoring = (champion[0].run_id, str(champion[0].version), champion[1].path)
    table = [{"model": name, **values} for name, values in results.items() if name != "curve"]
    tracking.log_evaluation(run.workspace, run_id, flat, table, results["curve"], models,
                            {"champion_decision": reason, "promoted": str(promote).lower()})
    log.info("evaluation: %s; %s", {k: round(v["ndcg"], 4) for k, v in results.items() if k != "curve"}, reason)
    return ChampionDecision(
        mlflow_run_id=scoring[0], model_version=scoring[1], models_path=scoring[2], promoted=promote, reason=reason,
        metrics=flat,
    )


def heldout_metrics(
    models: ModelDir, feature_set: FeatureSet, baselines: bool = True, lists: ListConfig = ListConfig()
) -> dict:
    """Accuracy and list metrics@10 of retrieval + ranking (and, with `baselines`, of
    popularity and retrieval alone) on the test split, plus recall at several cut-offs
    (`curve`); cached in the models' evaluation directory. `lists` says how `recommend`
    chooses the final lists.

    Without `baselines` the models may come from an earlier night (the champion): only the
    full path maps tonight's ids into the models' vocabulary.
    """
    cached = models.evaluation / f"{stage_key(feature_set.key, lists)}{'' if baselines else '-models-only'}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    features = load_features(feature_set.path)
    visible = features.events.filter(pl.col("split") != "test")
    known_items = visible["item_idx"].unique()
    test = features.events.filter((pl.col("split") == "test") & pl.col("item_idx").is_in(known_items.implode()))
    users = features.sampled(np.unique(test["user_idx"].to_numpy()))
    test = test.filter(pl.col("user_idx").is_in(users.tolist()))
    truth = test.select(pl.col("user_idx").alias("user"), pl.col("item_idx").alias("item"))
    deepest = max(CURVE)
    table = {"retrieval+ranking": model_lists(models, features, visible, users, deepest, lists)}
    if baselines:
        table |= {
            "popularity": popularity_lists(features, visible, users, deepest),
            "retrieval": retrieval_lists(models, features, visible, users, deepest, fit_model=True),
        }
    results: dict = {
        name: ranking_metrics(recs, truth, CUTOFF, features.n_items)
        | list_metrics(recs, features.item_popularity, features.item_categories, CUTOFF)
        for name, recs in table.items()
    }
    results["curve"] = {
        name: {str(k): ranking_metrics(recs, truth, k, features.n_items)["recall"] for k in CURVE}
        for name, recs in table.items()
    }
    write_json(results, cached)
    return results


def popularity_lists(features: Features, visible: pl.DataFrame, users: np.ndarray, k: int = CUTOFF) -> pl.DataFrame:
    """The baseline's lists, under tonight's business rules like every list."""
    counts = np.bincount(visible["item_idx"].to_numpy(), minlength=features.n_items + 1).astype(np.float32)
    allowed = servable_items(features, np.arange(features.n_items + 1), features.n_items + 1)
    top, _ = retrieve(np.ones((users.size, 1), np.float32), counts[:, None], _blocked(users, visible, features), k,
                      allowed=allowed)
    return as_table(users, top)


def retrieval_lists(
    models: ModelDir, features: Features, visible: pl.DataFrame, users: np.ndarray, k: int = CUTOFF,
    fit_model: bool = False,
) -> pl.DataFrame:
    """Tonight's two-tower model alone (with `fit_model`, the one trained on the fit split
    alone), under tonight's business rules."""
    bundle = RetrievalBundle.load(models, fit_model)
    history = user_histories(visible, features.n_users, bundle.history_length)[users]
    allowed = servable_items(features, np.arange(features.n_items + 1), bundle.item_embeddings.shape[0])
    top, _ = bundle.retrieve(users.astype(np.int32), history, _blocked(users, visible, features), k, allowed=allowed)
    return as_table(users, top)


def _blocked(users: np.ndarray, visible: pl.DataFrame, features: Features) -> tuple[np.ndarray, np.ndarray]:
    """(row in `users`, item) pairs no list may hold: what the user has seen, and tonight's exclusions."""
    excluded = features.exclusions.drop_nulls("user_idx").select("user_idx", "item_idx")
    return rows_of(users, pl.concat([visible.select("user_idx", "item_idx"), excluded], how="vertical_relaxed"))


def model_lists(
    models: ModelDir, features: Features, visible: pl.DataFrame, users: np.ndarray, k: int = CUTOFF,
    lists: ListConfig = ListConfig(),
) -> pl.DataFrame:
    recs = recommend(models, features, users, visible, k, lists=lists, fit_model=True)
    return recs.join(features.items.select("item_id", "item_idx"), on="item_id", how="left").select(
        pl.col("user_idx").alias("user"), pl.col("item_idx").fill_null(-1).alias("item"), "rank"
    )


evaluate_task = stage("evaluate", evaluate)
