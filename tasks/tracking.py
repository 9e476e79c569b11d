"""Tracking: all of recflow's MLflow code.

Where runs are tracked (MLFLOW_TRACKING_URI, a real server, or sqlite inside the
workspace); tonight's run (params, tags, metrics, artifacts, plots); the model registry
(both models registered once per model key; the `champion` alias); and the read side of
`recflow runs`. MLflow is imported inside the functions, so importing this module is
cheap.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import tempfile
import time
import warnings
from pathlib import Path

import polars as pl

from schemas.config import PipelineConfig, Run
from schemas.tables import RECOMMENDER, RECOMMENDER_MODELS, ModelDir, ModelSet, Snapshot, StageRecord
from tasks.workspace import RecflowError, code_version, publish_dir, temp_dir

log = logging.getLogger(__name__)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no progress bars in the run's log

RETRIEVAL_MODEL = "recflow-retrieval"
RANKING_MODEL = "recflow-ranking"
CHAMPION = "champion"
MODEL_KEY = "model_key"  # the tag that names a registered version's models directory
METRIC_PREFIX = {"retrieval+ranking": "", "retrieval": "retrieval_", "popularity": "popularity_"}  # per model
# The experiment's runs table as its links open it (MLflow's shared view state, an experiment
# tag): newest first, with the night's date, key metrics and champion decision as columns.
VIEW_KEY = "recflow"
VIEW_STATE = {
    "orderByKey": "attributes.start_time", "orderByAsc": False,
    "selectedColumns": ["tags.`run_date`", "metrics.`ndcg_at_10`", "metrics.`recall_at_10`",
                        "metrics.`coverage_at_10`", "tags.`promoted`", "tags.`champion_decision`"],
}
ML_VIEW = "workflowType=machine_learning"  # MLflow 3 opens its GenAI pages without it
DESCRIPTION = ("recflow's nightly recommender (retrieval + ranking): an MLflow pyfunc model; predict takes user_id "
               "(and optionally history, item ids oldest first) and returns each user's top-k list")


def tracking_uri(workspace: Path) -> str:
    """MLFLOW_TRACKING_URI when set (a real server), else sqlite inside the workspace."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{workspace / 'mlflow.db'}"


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


def client(workspace: Path):
    from mlflow.tracking import MlflowClient

    uri = tracking_uri(workspace)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# --- tonight's run -------------------------------------------------------------------


def start_run(run: Run, snapshot: Snapshot) -> str:
    """Open tonight's MLflow run with the config as params, tagged so the compare view
    lines nights up; return its id."""
    from mlflow.entities import Param

    mlflow = client(run.workspace)
    experiment = run.config.mlflow_experiment
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        location = (run.workspace / "mlartifacts").as_uri() if local else None
        experiment_id = mlflow.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = found.experiment_id
    if found is None or found.tags.get(f"mlflow.sharedViewState.{VIEW_KEY}") != json.dumps(VIEW_STATE):
        mlflow.set_experiment_tag(experiment_id, f"mlflow.sharedViewState.{VIEW_KEY}", json.dumps(VIEW_STATE))
    tags = {"run_date": run.run_date.isoformat(), "source": run.config.source, "data_hash": snapshot.data_hash,
            "code_version": code_version()}
    created = mlflow.create_run(experiment_id, run_name=f"nightly-{run.run_date.isoformat()}", tags=tags)
    params = _flatten(run.config.model_dump(mode="json", exclude={"run_date", "workspace"}))
    params["run_date"] = run.run_date
    mlflow.log_batch(created.info.run_id, params=[Param(key, str(value)[:500]) for key, value in params.items()])
    log_snapshot(mlflow, created.info.run_id, snapshot)
    log.info("MLflow run %s at %s", created.info.run_id, tracking_uri(run.workspace))
    return created.info.run_id


def log_snapshot(tracking, run_id: str, snapshot: Snapshot) -> None:
    """The validated snapshot as the run's dataset inputs (MLflow's lineage: source path,
    digest, schema, rows), interactions and, when there is one, items. The digest hashes the
    table's file, so identical input shows the same digest every night."""
    import mlflow.data
    from mlflow.entities import DatasetInput, InputTag

    tables = {"interactions": snapshot.interactions} | ({"items": snapshot.items} if snapshot.has_items else {})
    inputs = []
    for name, path in tables.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and warns that it chose
            warnings.simplefilter("ignore", UserWarning)
            dataset = mlflow.data.from_polars(pl.read_parquet(path), source=str(path), digest=digest,
                                              name=f"{snapshot.source.rstrip('/').rsplit('/', 1)[-1]}-{name}")
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")]))
    tracking.log_inputs(run_id, datasets=inputs)


def log_outcome(workspace: Path, run_id: str, stages: dict[str, StageRecord], seconds: float,
                artifacts: dict[str, Path]) -> None:
    """Log what tonight's stages report: each stage's seconds, which of them reused an
    earlier run's output, what each measured (`StageRecord.run_metrics`, `run_tags`,
    `run_tables`), the run's total seconds, and `artifacts` (name -> file or directory)."""
    from mlflow.entities import Metric, RunTag

    reused = [name for name, record in stages.items() if record.reused]
    metrics = {f"time_{name}_s": record.seconds for name, record in stages.items()}
    tags = {"reused_stages": ",".join(reused) or "none"}
    for record in stages.values():
        metrics |= record.run_metrics()
        tags |= record.run_tags()
    metrics |= {"time_total_s": round(seconds, 2), "stages_reused": len(reused)}
    mlflow = client(workspace)
    now = int(time.time() * 1000)
    mlflow.log_batch(run_id, metrics=[Metric(key, float(value), now, 0) for key, value in metrics.items()],
                     tags=[RunTag(key, value) for key, value in tags.items()])
    for name, path in artifacts.items():
        if path.is_dir():
            mlflow.log_artifacts(run_id, str(path), name)
        elif path.exists():
            mlflow.log_artifact(run_id, str(path), name)
    with tempfile.TemporaryDirectory() as scratch:
        for record in stages.values():
            for name, rows in record.run_tables().items():
                pl.DataFrame(rows).write_csv(Path(scratch) / name)
                mlflow.log_artifact(run_id, str(Path(scratch) / name))


def end_run(workspace: Path, run_id: str, failed: bool = False) -> None:
    """Close tonight's run. Marking a failed run never hides why it failed: when the
    tracking server cannot be told, that is logged and the run's own error goes on."""
    try:
        client(workspace).set_terminated(run_id, status="FAILED" if failed else "FINISHED")
    except Exception as error:
        if not failed:
            raise
        log.warning("could not mark MLflow run %s failed: %s", run_id, str(error).splitlines()[0][:300])


def lost_server(workspace: Path, error: BaseException) -> RecflowError | None:
    """The one-line error for a run whose tracking server stopped answering after it
    started (`error` is what the MLflow client raised), or None for any other error."""
    import requests
    from mlflow.exceptions import MlflowException

    lost = isinstance(error, requests.ConnectionError) or (
        isinstance(error, MlflowException) and ("Max retries exceeded" in str(error) or "Connection" in str(error)))
    if not lost:
        return None
    return RecflowError(f"MLflow tracking server {tracking_uri(workspace)} stopped answering during the run; "
                        "start it again (`recflow stack up`) and rerun the date")


def run_link(workspace: Path, run_id: str) -> str:
    """Where to look at a run: its page in the MLflow UI, or the local tracking URI."""
    uri = tracking_uri(workspace)
    if not uri.startswith("http"):
        return uri
    experiment_id = client(workspace).get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{ML_VIEW}"


def runs_link(workspace: Path, run_id: str) -> str:
    """The experiment's runs table in the MLflow UI, with recflow's columns (VIEW_STATE), or
    the local tracking URI."""
    uri = tracking_uri(workspace)
    if not uri.startswith("http"):
        return uri
    experiment_id = client(workspace).get_run(run_id).info.experiment_id
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs?{ML_VIEW}&viewStateShareKey={VIEW_KEY}"


def log_metrics(workspace: Path, run_id: str, metrics: dict[str, float]) -> None:
    """`metrics` (name -> value) in tonight's run."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(workspace).log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()])


def log_evaluation(workspace: Path, run_id: str, metrics: dict[str, float], table: list[dict],
                   curves: dict[str, dict[str, float]], models: ModelSet, decision: dict[str, str]) -> None:
    """The evaluation stage's results in tonight's run: held-out `metrics`, the metrics
    `table` as metrics.csv, each model's recall@K curve (`curves`: model -> K -> recall; a
    stepped metric `<METRIC_PREFIX>recall_curve`, step K), the plots and the champion
    `decision` tags."""
    from mlflow.entities import Metric, RunTag

    mlflow = client(workspace)
    now = int(time.time() * 1000)
    stepped = [Metric(f"{METRIC_PREFIX[name]}recall_curve", value, now, int(k)) for name, curve in curves.items()
               for k, value in curve.items()]
    mlflow.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()] + stepped)
    with tempfile.TemporaryDirectory() as scratch:
        pl.DataFrame(table).write_csv(Path(scratch) / "metrics.csv")
        mlflow.log_artifact(run_id, str(Path(scratch) / "metrics.csv"))
    for name, figure in _plots(curves, models).items():
        mlflow.log_figure(run_id, figure, f"plots/{name}.png")
    mlflow.log_batch(run_id, tags=[RunTag(key, value) for key, value in decision.items()])


def _plots(curves: dict[str, dict[str, float]], models: ModelSet) -> dict:
    """recall_at_k.png: each model's recall@K, defined in its title; training.png: each
    model's per-epoch curves, losses on the left axis and recalls on their own right axis,
    with the epochs kept marked."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    recall, axes = plt.subplots(figsize=(7, 4.5))
    for name, curve in curves.items():
        axes.plot([int(k) for k in curve], list(curve.values()), marker="o", label=name)
    cutoffs = sorted({int(k) for curve in curves.values() for k in curve})
    axes.set(xscale="log", xlabel="K", ylabel="recall@K", xticks=cutoffs, xticklabels=[str(k) for k in cutoffs],
             title="Recall@K on the held-out split\n(held-out items in the top K / min(K, the user's held-out items))")
    if curves:
        axes.legend()
    training, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    kept = {"retrieval": (models.retrieval, "kept: epoch {} (best validation recall)"),
            "ranking": (models.ranking, "final ranker: {} epoch(s)")}
    for ax, (name, (trained, label)) in zip(axes, kept.items()):
        losses = {series: values for series, values in trained.history.items() if "recall" not in series}
        recalls = {series: values for series, values in trained.history.items() if "recall" in series}
        lines = [ax.plot(range(1, len(v) + 1), v, marker="o", label=s)[0] for s, v in losses.items()]
        ax.set(xlabel="epoch", ylabel="loss", title=f"{name} training")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if recalls:
            right = ax.twinx()
            lines += [right.plot(range(1, len(v) + 1), v, marker="s", linestyle="--", color=f"C{i + len(losses)}",
                                 label=s)[0] for i, (s, v) in enumerate(recalls.items())]
            right.set_ylabel("recall")
        if trained.epochs:
            lines.append(ax.axvline(trained.epochs, color="grey", linestyle=":", label=label.format(trained.epochs)))
        if lines:
            ax.legend(handles=lines, loc="best", fontsize="small")
    figures = {"recall_at_k": recall, "training": training}
    for figure in figures.values():
        figure.tight_layout()
        plt.close(figure)
    return figures


# --- the registry --------------------------------------------------------------------


def log_recommender(workspace: Path, run_id: str, models: ModelDir, features: Path, config: PipelineConfig) -> None:
    """Log tonight's models, scoring from the feature set at `features` with `config`'s list
    settings, as the MLflow model `recommender` of `run_id` (tasks/serving.py)."""
    from tasks import serving

    with tempfile.TemporaryDirectory() as scratch:
        serving.save(Path(scratch) / RECOMMENDER, models, features, config.top_k, config.lists)
        client(workspace).log_artifacts(run_id, str(Path(scratch) / RECOMMENDER), RECOMMENDER)


def register(workspace: Path, run_id: str, model_key: str) -> str:
    """Register the `recommender` model of `run_id` (log_recommender) as a version of both
    registered models, tagged with `model_key`, once: a version already registered for
    `model_key` is found and reused, so a rerun or retry never registers the same models
    twice. Returns the retrieval model's version."""
    from mlflow.exceptions import MlflowException

    mlflow = client(workspace)
    source = f"{mlflow.get_run(run_id).info.artifact_uri}/{RECOMMENDER}"
    versions = []
    for name in (RETRIEVAL_MODEL, RANKING_MODEL):
        found = mlflow.search_model_versions(f"name='{name}' and tags.{MODEL_KEY}='{model_key}'")
        if found:
            versions.append(min(found, key=lambda version: int(version.version)).version)
            continue
        try:
            mlflow.create_registered_model(name, description=DESCRIPTION)
        except MlflowException:
            pass  # already registered
        versions.append(mlflow.create_model_version(name, source, run_id=run_id, tags={MODEL_KEY: model_key}).version)
    return str(versions[0])


def promote(workspace: Path, version: str) -> None:
    """Make `version` of both models the champion. The retrieval model's alias is the commit
    point (`champion` reads only it), so it moves last: a run killed in between leaves the
    old champion whole."""
    mlflow = client(workspace)
    for name in (RANKING_MODEL, RETRIEVAL_MODEL):
        mlflow.set_registered_model_alias(name, CHAMPION, version)


def tag_version(workspace: Path, version: str, tags: dict[str, str]) -> None:
    """Tag `version` of both models (e.g. with the champion decision it met)."""
    mlflow = client(workspace)
    for name in (RETRIEVAL_MODEL, RANKING_MODEL):
        for key, value in tags.items():
            mlflow.set_model_version_tag(name, version, key, value)


def champion(workspace: Path):
    """(registered version, its models directory) of the current champion, or None.

    The models directory is models/<model key> in the workspace, downloaded from the
    version's MLflow run when the workspace lacks it (a fresh machine, a lost workspace).
    """
    from mlflow.exceptions import MlflowException

    mlflow = client(workspace)
    try:
        version = mlflow.get_model_version_by_alias(RETRIEVAL_MODEL, CHAMPION)
    except MlflowException as error:
        if lost_server(workspace, error):  # a server that does not answer is not "no champion"
            raise
        return None
    models = ModelDir.of(workspace, version.tags.get(MODEL_KEY, version.run_id))
    if not models.is_complete():
        # versions registered before the recommender was logged point into the run's `models`
        logged = RECOMMENDER_MODELS if version.source.endswith(RECOMMENDER) else "models"
        staging = temp_dir(workspace, "champion")
        mlflow.download_artifacts(version.run_id, logged, str(staging))
        publish_dir(staging / Path(logged).name, models.path)  # MLflow downloads into the path's last part
    return version, models


def champion_models(workspace: Path) -> ModelDir | None:
    """The current champion's models directory, or None when there is none."""
    found = champion(workspace)
    return found[1] if found else None


# --- reading runs back ---------------------------------------------------------------


def recent_runs(workspace: Path, experiment: str, last: int) -> pl.DataFrame | None:
    """The last runs side by side (one column per run, newest first), for `recflow runs`."""
    runs = stored_runs(tracking_uri(workspace), experiment, last)
    if runs is None:
        return None
    fields = {
        "status": lambda r: r["status"],
        "promoted": lambda r: r["tags"].get("promoted", ""),
        "stages reused": lambda r: _count(r["tags"].get("reused_stages", "")),
        "source": lambda r: r["tags"].get("source", ""),
        "data hash": lambda r: r["tags"].get("data_hash", ""),
        **{
            label: (lambda r, key=key: _cell(r["metrics"].get(key)))
            for label, key in (
                ("ndcg@10", "ndcg_at_10"), ("recall@10", "recall_at_10"), ("champion ndcg@10", "champion_ndcg_at_10"),
                ("retrieval-only ndcg@10", "retrieval_ndcg_at_10"), ("popularity ndcg@10", "popularity_ndcg_at_10"),
                ("retrieval epochs", "retrieval_epochs"), ("output rows", "output_rows"),
                ("short lists", "lists_short_lists"), ("new lists", "lists_new_lists"),
                ("list overlap", "lists_overlap"), ("coverage", "lists_coverage"),
                ("coverage change", "lists_coverage_change"), ("popularity ratio", "lists_popularity_ratio"),
                ("popularity change", "lists_popularity_change"), ("score PSI", "lists_score_psi"),
                ("interactions", "data_interactions"), ("total seconds", "time_total_s"),
            )
        },
        "run id": lambda r: r["run_id"],
        "champion decision": lambda r: r["tags"].get("champion_decision", ""),
    }
    columns = {"": list(fields)}
    for found_run in runs:
        label = f"{found_run['tags'].get('run_date', '?')} ({found_run['run_id'][:6]})"
        columns[label] = [get(found_run) for get in fields.values()]
    return pl.DataFrame(columns)


def stored_runs(uri: str, experiment: str, last: int) -> list[dict] | None:
    """The experiment's last active runs, newest first: run_id, status, tags, latest
    metrics; None when there is no such experiment. The workspace's sqlite store is read
    with plain SQL (MLflow's own tables), because importing MLflow takes longer than a
    lookup may; any other store through MLflow's client."""
    if not uri.startswith("sqlite:///"):
        return _client_runs(uri, experiment, last)
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.exists():
        return None
    with contextlib.closing(sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)) as db:
        found = db.execute("SELECT experiment_id FROM experiments WHERE name = ?", (experiment,)).fetchone()
        if found is None:
            return None
        runs = db.execute("SELECT run_uuid, status FROM runs WHERE experiment_id = ? AND lifecycle_stage = 'active' "
                          "ORDER BY start_time DESC LIMIT ?", (found[0], last)).fetchall()
        return [{"run_id": run_id, "status": status,
                 "tags": dict(db.execute("SELECT key, value FROM tags WHERE run_uuid = ?", (run_id,))),
                 "metrics": dict(db.execute("SELECT key, value FROM latest_metrics WHERE run_uuid = ?", (run_id,)))}
                for run_id, status in runs]


def _client_runs(uri: str, experiment: str, last: int) -> list[dict] | None:
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(tracking_uri=uri)
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = mlflow.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=last)
    return [{"run_id": r.info.run_id, "status": r.info.status, "tags": r.data.tags, "metrics": r.data.metrics}
            for r in runs]


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() else str(round(value, 4))


def _count(stages: str) -> str:
    return str(len(stages.split(","))) if stages and stages != "none" else "0"


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
