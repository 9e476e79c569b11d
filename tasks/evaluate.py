"""Evaluation: metrics on the held-out split, the MLflow run, the registry and the champion gate.

Sixth stage of the nightly DAG. It scores popularity, retrieval alone and retrieval +
ranking on each user's latest (`test`) events with the same functions the benchmarks use,
logs everything about the run to MLflow, registers both models, and promotes them to
`champion` only when they beat the current champion on NDCG@10 on the same held-out data.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from mlflow.entities import Metric, Param, RunTag
from prefect import task
from scipy.stats import rankdata

from schemas.config import ListConfig
from schemas.tables import ChampionDecision, FeatureSet, ModelSet
from tasks.features import Features, load_features, padded, user_histories
from tasks.retrieval import RetrievalBundle, as_table, retrieve, rows_of
from tasks.score import recommend
from tasks.workspace import RecflowError, code_version, publish_dir, stage_key, temp_dir, write_json

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


def list_metrics(recs: pl.DataFrame, features: Features, k: int) -> dict[str, float]:
    """Beyond accuracy, averaged over users with a list: intra-list `diversity` (mean
    1 - cosine of the category sets of each pair of items in a top-`k` list, pairs with
    an uncategorised item left out), `novelty` (mean self-information -log2 p of the
    items, p their smoothed share of `fit` events) and `popularity_bias` (mean popularity
    percentile of the items, ties sharing their average rank: 1 = the most popular, about
    0.5 for lists drawn at random). `recs` has columns user, item (tonight's
    item_idx; unknown items < 1 are skipped), rank."""
    top = recs.filter((pl.col("rank") <= k) & (pl.col("item") > 0)).sort("user", "rank")
    if top.is_empty():
        return {"diversity": 0.0, "novelty": 0.0, "popularity_bias": 0.0}
    popularity = features.item_popularity[1:]
    share = np.concatenate([[1.0], (popularity + 1) / (popularity.sum() + popularity.size)])
    percentile = np.concatenate([[0.0], rankdata(popularity, method="average") / popularity.size])
    per_user = top.with_columns(
        pl.Series("information", -np.log2(share[top["item"].to_numpy()])),
        pl.Series("percentile", percentile[top["item"].to_numpy()]),
    ).group_by("user").agg(pl.col("information").mean(), pl.col("percentile").mean())
    lists = padded(top.group_by("user", maintain_order=True).agg(pl.col("item"))["item"], k)[1:]
    return {
        "diversity": _intra_list_diversity(features.item_categories[lists], lists > 0),
        "novelty": float(per_user["information"].mean()),
        "popularity_bias": float(per_user["percentile"].mean()),
    }


def _intra_list_diversity(categories: np.ndarray, present: np.ndarray, block: int = 4096) -> float:
    """Mean over lists with two or more categorised items of their mean pairwise category
    dissimilarity (0 when no list has two); `categories` (lists, k, C) holds category
    indices, 0 = none."""
    k = present.shape[1]
    totals = []
    for start in range(0, present.shape[0], block):
        cats, real = categories[start : start + block], present[start : start + block]
        sizes = (cats > 0).sum(-1)
        shared = ((cats[:, :, None, :, None] == cats[:, None, :, None, :]) & (cats[:, :, None, :, None] > 0)).sum((3, 4))
        cosine = shared / np.sqrt(np.maximum(sizes[:, :, None] * sizes[:, None, :], 1))
        real = real & (sizes > 0)
        pairs = real[:, :, None] & real[:, None, :] & ~np.eye(k, dtype=bool)
        counted = pairs.sum((1, 2)) > 0
        totals.append(((1 - cosine) * pairs).sum((1, 2))[counted] / pairs.sum((1, 2))[counted])
    values = np.concatenate(totals)
    return float(values.mean()) if values.size else 0.0


# --- the stage -----------------------------------------------------------------------

CUTOFF = 10
CURVE = (1, 5, 10, 20, 50)  # cut-offs of the recall@K curve
RETRIEVAL_MODEL = "recflow-retrieval"
RANKING_MODEL = "recflow-ranking"
CHAMPION = "champion"


def evaluate(
    feature_set: FeatureSet, feature_key: str, models: ModelSet, run_id: str, workspace: Path, n_candidates: int,
    lists: ListConfig = ListConfig(), retire_champion: bool = False,
) -> ChampionDecision:
    """Score tonight's models (and the champion) on the test split; log, register, decide.

    With `retire_champion` (it was trained with users now on the deletion list) tonight's
    models replace the champion whatever their metrics.
    """
    results = heldout_metrics(models.path, feature_set, feature_key, n_candidates, lists=lists)
    flat = {f"{_metric_prefix(name)}{m}_at_{CUTOFF}": v for name, values in results.items() for m, v in values.items()
            if name != "curve"}
    client = _client(workspace)
    champion = _champion(client, workspace)
    new_ndcg = results["retrieval+ranking"]["ndcg"]
    if champion is not None and champion[1] == models.path:
        promote, version = False, str(champion[0].version)
        reason = f"tonight's models are champion v{version} already (same input, config and code)"
        flat |= {f"champion_{m}_at_{CUTOFF}": v for m, v in results["retrieval+ranking"].items()}
    else:
        version = _register(client, run_id, models.key)
        if champion is None:
            promote, reason = True, "no champion yet"
        elif retire_champion:
            promote = True
            reason = f"champion v{champion[0].version} was trained with users now on the deletion list: retired"
        else:
            held = heldout_metrics(champion[1], feature_set, feature_key, n_candidates, baselines=False,
                                   lists=lists)["retrieval+ranking"]
            flat |= {f"champion_{m}_at_{CUTOFF}": v for m, v in held.items()}
            promote = new_ndcg > held["ndcg"]
            reason = (
                f"NDCG@{CUTOFF} {new_ndcg:.4f} {'beats' if promote else 'does not beat'} "
                f"champion v{champion[0].version} ({held['ndcg']:.4f})"
            )
    if promote:
        # The retrieval model's alias is the commit point (`_champion` reads only it), so it
        # moves last: a run killed in between leaves the old champion whole.
        for name in (RANKING_MODEL, RETRIEVAL_MODEL):
            client.set_registered_model_alias(name, CHAMPION, version)
        scoring = (run_id, version, models.path)
    else:
        scoring = (champion[0].run_id, str(champion[0].version), champion[1])
    _log_evaluation(client, run_id, flat, results, models)
    client.log_batch(run_id, tags=[RunTag("champion_decision", reason), RunTag("promoted", str(promote).lower())])
    log.info("evaluation: %s; %s", {k: round(v["ndcg"], 4) for k, v in results.items() if k != "curve"}, reason)
    return ChampionDecision(
        mlflow_run_id=scoring[0], model_version=scoring[1], models_path=scoring[2], promoted=promote, reason=reason,
        metrics=flat,
    )


def _log_evaluation(client, run_id: str, flat: dict, results: dict, models: ModelSet) -> None:
    """Metrics, the metrics table, both models and two plots, into tonight's MLflow run."""
    now = int(time.time() * 1000)
    curves = [
        Metric(f"{_metric_prefix(name)}recall_curve", value, now, int(k))
        for name, curve in results["curve"].items()
        for k, value in curve.items()
    ]
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in flat.items()] + curves)
    rows = [{"model": name, **values} for name, values in results.items() if name != "curve"]
    with tempfile.TemporaryDirectory() as scratch:
        pl.DataFrame(rows).write_csv(Path(scratch) / "metrics.csv")
        client.log_artifact(run_id, str(Path(scratch) / "metrics.csv"))
    client.log_artifacts(run_id, str(models.path), "models")
    for name, figure in _plots(results["curve"], models).items():
        client.log_figure(run_id, figure, f"plots/{name}.png")


def _plots(curves: dict, models: ModelSet) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    recall, axes = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        axes.plot([int(k) for k in curve], list(curve.values()), marker="o", label=name)
    axes.set(xscale="log", xlabel="K", ylabel="recall@K", title="Recall@K on the held-out split")
    axes.legend()
    training, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (name, trained) in zip(axes, (("retrieval", models.retrieval), ("ranking", models.ranking))):
        for series, values in trained.history.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", label=series)
        ax.set(xlabel="epoch", title=f"{name} training")
        ax.legend()
    figures = {"recall_at_k": recall, "training": training}
    for figure in figures.values():
        figure.tight_layout()
        plt.close(figure)
    return figures


def heldout_metrics(
    models: Path, feature_set: FeatureSet, feature_key: str, n_candidates: int, baselines: bool = True,
    lists: ListConfig = ListConfig(),
) -> dict:
    """Accuracy and list metrics@10 of retrieval + ranking (and, with `baselines`, of
    popularity and retrieval alone) on the test split, plus recall at several cut-offs
    (`curve`); cached in models/evaluation/. `lists` says how `recommend` chooses
    the final lists.

    Without `baselines` the models may come from an earlier night (the champion): only the
    full path maps tonight's ids into the models' vocabulary.
    """
    cached = models / "evaluation" / f"{stage_key(feature_key, lists)}{'' if baselines else '-models-only'}.json"
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
    table = {"retrieval+ranking": model_lists(models, features, visible, users, n_candidates, deepest, lists)}
    if baselines:
        table |= {
            "popularity": popularity_lists(features, visible, users, deepest),
            "retrieval": retrieval_lists(models, features, visible, users, deepest),
        }
    results: dict = {
        name: ranking_metrics(recs, truth, CUTOFF, features.n_items) | list_metrics(recs, features, CUTOFF)
        for name, recs in table.items()
    }
    results["curve"] = {
        name: {str(k): ranking_metrics(recs, truth, k, features.n_items)["recall"] for k in CURVE}
        for name, recs in table.items()
    }
    write_json(results, cached)
    return results


def _metric_prefix(model: str) -> str:
    return {"retrieval+ranking": "", "retrieval": "retrieval_", "popularity": "popularity_"}[model]


def popularity_lists(features: Features, visible: pl.DataFrame, users: np.ndarray, k: int = CUTOFF) -> pl.DataFrame:
    counts = np.bincount(visible["item_idx"].to_numpy(), minlength=features.n_items + 1).astype(np.float32)
    exclude = rows_of(users, visible)
    top, _ = retrieve(np.ones((users.size, 1), np.float32), counts[:, None], exclude, k)
    return as_table(users, top)


def retrieval_lists(
    models: Path, features: Features, visible: pl.DataFrame, users: np.ndarray, k: int = CUTOFF
) -> pl.DataFrame:
    bundle = RetrievalBundle.load(models / "retrieval")
    history = user_histories(visible, features.n_users, bundle.history_length)[users]
    top, _ = bundle.retrieve(users.astype(np.int32), history, rows_of(users, visible), k)
    return as_table(users, top)


def model_lists(
    models: Path, features: Features, visible: pl.DataFrame, users: np.ndarray, n: int, k: int = CUTOFF,
    lists: ListConfig = ListConfig(),
) -> pl.DataFrame:
    recs = recommend(models, features, users, visible, n, k, lists=lists)
    return recs.join(features.items.select("item_id", "item_idx"), on="item_id", how="left").select(
        pl.col("user_idx").alias("user"), pl.col("item_idx").fill_null(-1).alias("item"), "rank"
    )


# --- MLflow --------------------------------------------------------------------------


def check_tracking(workspace: Path) -> None:
    """Fail fast, before any heavy work, when the MLflow tracking server does not answer."""
    import urllib.request

    uri = tracking_uri(workspace)
    if not uri.startswith("http"):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
            return
    except OSError as error:
        raise RecflowError(
            f"MLflow tracking server {uri} is unreachable ({getattr(error, 'reason', error)}); start it "
            "(`recflow stack up`) or unset MLFLOW_TRACKING_URI to track in the workspace's sqlite store"
        ) from None


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
        tags={"run_date": run_date.isoformat(), "source": source, "data_hash": data_hash, "code_version": code_version()},
    )
    client.log_batch(run.info.run_id, params=[Param(key, str(value)[:500]) for key, value in params.items()])
    log.info("MLflow run %s at %s", run.info.run_id, tracking_uri(workspace))
    return run.info.run_id


def log_run_data(
    workspace: Path, run_id: str, metrics: dict[str, float], artifacts: dict[str, Path], tags: dict[str, str]
) -> None:
    client = _client(workspace)
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
        tags=[RunTag(key, value) for key, value in tags.items()],
    )
    for name, path in artifacts.items():
        if path.is_dir():
            client.log_artifacts(run_id, str(path), name)
        elif path.exists():
            client.log_artifact(run_id, str(path), name)


def run_link(workspace: Path, run_id: str) -> str:
    """Where to look at a run: its page in the MLflow UI, or the local tracking URI."""
    uri = tracking_uri(workspace)
    if not uri.startswith("http"):
        return uri
    experiment_id = _client(workspace).get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def recent_runs(workspace: Path, experiment: str, last: int) -> pl.DataFrame | None:
    """The last runs side by side (one column per run, newest first), for `recflow runs`."""
    client = _client(workspace)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=last)
    fields = {
        "status": lambda r: r.info.status,
        "promoted": lambda r: r.data.tags.get("promoted", ""),
        "stages reused": lambda r: _count(r.data.tags.get("reused_stages", "")),
        "source": lambda r: r.data.tags.get("source", ""),
        "data hash": lambda r: r.data.tags.get("data_hash", ""),
        **{
            label: (lambda r, key=key: _cell(r.data.metrics.get(key)))
            for label, key in (
                ("ndcg@10", "ndcg_at_10"), ("recall@10", "recall_at_10"), ("champion ndcg@10", "champion_ndcg_at_10"),
                ("retrieval-only ndcg@10", "retrieval_ndcg_at_10"), ("popularity ndcg@10", "popularity_ndcg_at_10"),
                ("retrieval epochs", "retrieval_epochs"), ("output rows", "output_rows"),
                ("interactions", "data_interactions"), ("total seconds", "time_total_s"),
            )
        },
        "run id": lambda r: r.info.run_id,
    }
    columns = {"": list(fields)}
    for run in runs:
        columns[f"{run.data.tags.get('run_date', '?')} ({run.info.run_id[:6]})"] = [get(run) for get in fields.values()]
    return pl.DataFrame(columns)


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else str(round(value, 4))


def _count(stages: str) -> str:
    return str(len(stages.split(","))) if stages and stages != "none" else "0"


def end_run(workspace: Path, run_id: str, failed: bool = False) -> None:
    _client(workspace).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def _register(client, run_id: str, model_key: str) -> str:
    from mlflow.exceptions import MlflowException

    artifact_uri = client.get_run(run_id).info.artifact_uri
    versions = []
    for name, path in ((RETRIEVAL_MODEL, "models/retrieval"), (RANKING_MODEL, "models/ranking")):
        try:
            client.create_registered_model(name, description="recflow nightly model (SavedModel)")
        except MlflowException:
            pass  # already registered
        versions.append(
            client.create_model_version(name, f"{artifact_uri}/{path}", run_id=run_id, tags={"model_key": model_key}).version
        )
    return str(versions[0])


def champion_models(workspace: Path) -> Path | None:
    """The local models directory of the current champion, or None when there is none."""
    champion = _champion(_client(workspace), workspace)
    return champion[1] if champion else None


def _champion(client, workspace: Path):
    """(model version, local models directory) of the current champion, or None."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(RETRIEVAL_MODEL, CHAMPION)
    except MlflowException:
        return None
    models = workspace / "models" / version.tags.get("model_key", version.run_id)
    if not (models / "ranking").exists():
        staging = temp_dir(workspace, "champion")
        client.download_artifacts(version.run_id, "models", str(staging))
        publish_dir(staging / "models", models)
    return version, models


@task(name="evaluate")
def evaluate_task(
    feature_set: FeatureSet, feature_key: str, models: ModelSet, run_id: str, workspace: Path, n_candidates: int,
    lists: ListConfig, retire_champion: bool,
) -> ChampionDecision:
    return evaluate(feature_set, feature_key, models, run_id, workspace, n_candidates, lists, retire_champion)
