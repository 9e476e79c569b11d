"""Evaluation: metrics on the held-out split, the MLflow run, the registry and the champion gate.

Sixth stage of the nightly DAG. It scores popularity, retrieval alone and retrieval +
ranking on each user's latest (`test`) events with the same functions the benchmarks use,
logs everything about the run to MLflow, registers both models, and promotes them to
`champion` only when they beat the current champion on NDCG@10 on the same held-out data.
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from mlflow.entities import Metric, Param
from prefect import task

from schemas.tables import ChampionDecision, FeatureSet
from tasks.features import Features, load_features, user_histories
from tasks.retrieval import RetrievalBundle, as_table, retrieve, rows_of
from tasks.score import recommend

log = logging.getLogger(__name__)

RANK_METRICS = ("recall", "ndcg", "map", "hitrate", "mrr", "coverage")


def ranking_metrics(recs: pl.DataFrame, truth: pl.DataFrame, k: int, n_items: int) -> dict[str, float]:
    """Recall, NDCG, MAP, hit rate and MRR at `k`, averaged over users in `truth`, and coverage.

    `recs` has columns user, item, rank (1 = best); `truth` has user, item (the held-out
    relevant items). A user in `truth` without recommendations counts as all misses.
    Recall@k divides hits by min(k, #relevant); gains are binary; coverage is the share of
    the `n_items` catalogue that appears in any list.
    """
    top = recs.filter(pl.col("rank") <= k).select("user", "item", "rank")
    relevant = truth.select("user", "item").unique()
    per_user_relevant = relevant.group_by("user").agg(pl.len().alias("n_relevant"))
    hits = top.join(relevant, on=["user", "item"], how="inner").sort("user", "rank")
    discount = 1.0 / (pl.col("rank") + 1).cast(pl.Float64).log(2)
    hit_number = pl.int_range(1, pl.len() + 1).over("user")
    per_user = (
        hits.group_by("user")
        .agg(
            pl.len().alias("hits"),
            discount.sum().alias("dcg"),
            (hit_number / pl.col("rank")).sum().alias("precision_sum"),
            (1.0 / pl.col("rank").min()).alias("reciprocal_rank"),
        )
        .join(per_user_relevant, on="user", how="right")
        .fill_null(0)
        .with_columns(pl.min_horizontal(pl.col("n_relevant"), pl.lit(k)).alias("ideal"))
    )
    ideal = per_user["ideal"].to_numpy()
    idcg = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))[np.maximum(ideal, 1) - 1]
    users = max(per_user.height, 1)
    return {
        "recall": float((per_user["hits"] / per_user["ideal"]).sum() / users),
        "ndcg": float((per_user["dcg"].to_numpy() / idcg).sum() / users),
        "map": float((per_user["precision_sum"] / per_user["ideal"]).sum() / users),
        "hitrate": float((per_user["hits"] > 0).sum() / users),
        "mrr": float(per_user["reciprocal_rank"].sum() / users),
        "coverage": float(top["item"].n_unique() / max(n_items, 1)),
    }


# --- the stage -----------------------------------------------------------------------

CUTOFF = 10
RETRIEVAL_MODEL = "recflow-retrieval"
RANKING_MODEL = "recflow-ranking"
CHAMPION = "champion"


def evaluate(
    feature_set: FeatureSet, models: Path, run_id: str, workspace: Path, n_candidates: int
) -> ChampionDecision:
    """Score tonight's models (and the champion) on the test split; log, register, decide."""
    features = load_features(feature_set.path)
    visible = features.events.filter(pl.col("split") != "test")
    known_items = visible["item_idx"].unique()
    test = features.events.filter((pl.col("split") == "test") & pl.col("item_idx").is_in(known_items.implode()))
    truth = test.select(pl.col("user_idx").alias("user"), pl.col("item_idx").alias("item"))
    users = np.unique(test["user_idx"].to_numpy())

    table = {
        "popularity": popularity_lists(features, visible, users),
        "retrieval": retrieval_lists(models, features, visible, users),
        "retrieval+ranking": model_lists(models, features, visible, users, n_candidates),
    }
    results = {name: ranking_metrics(recs, truth, CUTOFF, features.n_items) for name, recs in table.items()}
    client = _client(workspace)
    client.log_batch(
        run_id,
        metrics=[
            Metric(f"{_metric_prefix(name)}{metric}_at_{CUTOFF}", value, int(time.time() * 1000), 0)
            for name, values in results.items()
            for metric, value in values.items()
        ],
    )
    metrics_table = pl.DataFrame([{"model": name, **values} for name, values in results.items()])
    with tempfile.TemporaryDirectory() as scratch:
        metrics_table.write_csv(Path(scratch) / "metrics.csv")
        client.log_artifact(run_id, str(Path(scratch) / "metrics.csv"))
    client.log_artifacts(run_id, str(models), "models")
    version = _register(client, run_id)
    new_ndcg = results["retrieval+ranking"]["ndcg"]
    champion = _champion(client, workspace)
    if champion is None:
        promote, reason, champion_ndcg = True, "no champion yet", None
    else:
        champion_recs = model_lists(champion[1], features, visible, users, n_candidates)
        champion_ndcg = ranking_metrics(champion_recs, truth, CUTOFF, features.n_items)["ndcg"]
        promote = new_ndcg > champion_ndcg
        reason = (
            f"NDCG@{CUTOFF} {new_ndcg:.4f} {'beats' if promote else 'does not beat'} "
            f"champion v{champion[0].version} ({champion_ndcg:.4f})"
        )
        client.log_metric(run_id, f"champion_ndcg_at_{CUTOFF}", champion_ndcg)
    if promote:
        for name in (RETRIEVAL_MODEL, RANKING_MODEL):
            client.set_registered_model_alias(name, CHAMPION, version)
    client.set_tag(run_id, "champion_decision", reason)
    client.set_tag(run_id, "promoted", str(promote).lower())
    log.info("evaluation: %s; %s", {k: round(v["ndcg"], 4) for k, v in results.items()}, reason)
    flat = {f"{_metric_prefix(n)}{m}_at_{CUTOFF}": v for n, values in results.items() for m, v in values.items()}
    if champion_ndcg is not None:
        flat[f"champion_ndcg_at_{CUTOFF}"] = champion_ndcg
    if promote:
        return ChampionDecision(
            mlflow_run_id=run_id, model_version=version, models_path=models, promoted=True, reason=reason, metrics=flat
        )
    return ChampionDecision(
        mlflow_run_id=champion[0].run_id,
        model_version=str(champion[0].version),
        models_path=champion[1],
        promoted=False,
        reason=reason,
        metrics=flat,
    )


def _metric_prefix(model: str) -> str:
    return {"retrieval+ranking": "", "retrieval": "retrieval_", "popularity": "popularity_"}[model]


def popularity_lists(features: Features, visible: pl.DataFrame, users: np.ndarray) -> pl.DataFrame:
    counts = np.bincount(visible["item_idx"].to_numpy(), minlength=features.n_items + 1).astype(np.float32)
    exclude = rows_of(users, visible)
    top, _ = retrieve(np.ones((users.size, 1), np.float32), counts[:, None], exclude, CUTOFF)
    return as_table(users, top)


def retrieval_lists(
    models: Path, features: Features, visible: pl.DataFrame, users: np.ndarray, k: int = CUTOFF
) -> pl.DataFrame:
    bundle = RetrievalBundle.load(models / "retrieval")
    history = user_histories(visible, features.n_users, bundle.history_length)[users]
    top, _ = bundle.retrieve(users.astype(np.int32), history, rows_of(users, visible), k)
    return as_table(users, top)


def model_lists(models: Path, features: Features, visible: pl.DataFrame, users: np.ndarray, n: int) -> pl.DataFrame:
    recs = recommend(models, features, users, visible, n, CUTOFF)
    return recs.join(features.items.select("item_id", "item_idx"), on="item_id", how="left").select(
        pl.col("user_idx").alias("user"), pl.col("item_idx").fill_null(-1).alias("item"), "rank"
    )


# --- MLflow --------------------------------------------------------------------------


def tracking_uri(workspace: Path) -> str:
    """MLFLOW_TRACKING_URI when set (a real server), else sqlite inside the workspace."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace / 'mlflow.db'}"


def _client(workspace: Path):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(workspace)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def start_run(workspace: Path, experiment: str, run_date, source: str, data_hash: str, params: dict) -> str:
    """Open tonight's MLflow run, tagged so the compare view lines nights up."""
    client = _client(workspace)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        location = (workspace / "mlartifacts").as_uri() if local else None
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    run = client.create_run(
        experiment_id,
        run_name=f"nightly-{run_date.isoformat()}",
        tags={"run_date": run_date.isoformat(), "source": source, "data_hash": data_hash, "code_version": _code_version()},
    )
    client.log_batch(run.info.run_id, params=[Param(key, str(value)[:500]) for key, value in params.items()])
    log.info("MLflow run %s at %s", run.info.run_id, tracking_uri(workspace))
    return run.info.run_id


def log_run_data(workspace: Path, run_id: str, metrics: dict[str, float], artifacts: dict[str, Path]) -> None:
    client = _client(workspace)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()])
    for name, path in artifacts.items():
        if path.is_dir():
            client.log_artifacts(run_id, str(path), name)
        elif path.exists():
            client.log_artifact(run_id, str(path), name)


def end_run(workspace: Path, run_id: str, failed: bool = False) -> None:
    _client(workspace).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _register(client, run_id: str) -> str:
    from mlflow.exceptions import MlflowException

    artifact_uri = client.get_run(run_id).info.artifact_uri
    versions = []
    for name, path in ((RETRIEVAL_MODEL, "models/retrieval"), (RANKING_MODEL, "models/ranking")):
        try:
            client.create_registered_model(name, description="recflow nightly model (SavedModel)")
        except MlflowException:
            pass  # already registered
        versions.append(client.create_model_version(name, f"{artifact_uri}/{path}", run_id=run_id).version)
    return str(versions[0])


def _champion(client, workspace: Path):
    """(model version, local models directory) of the current champion, or None."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(RETRIEVAL_MODEL, CHAMPION)
    except MlflowException:
        return None
    models = workspace / "models" / version.run_id
    if not (models / "ranking").exists():
        models.mkdir(parents=True, exist_ok=True)
        client.download_artifacts(version.run_id, "models", str(models.parent / f".{version.run_id}"))
        os.replace(models.parent / f".{version.run_id}" / "models", models)
    return version, models


def _code_version() -> str:
    from importlib.metadata import version

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version('recflow')}+{sha}" if sha else version("recflow")


@task(name="evaluate")
def evaluate_task(feature_set: FeatureSet, models: Path, run_id: str, workspace: Path, n_candidates: int) -> ChampionDecision:
    return evaluate(feature_set, models, run_id, workspace, n_candidates)
