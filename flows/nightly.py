"""The nightly DAG as one Prefect flow: wiring, parameters and artifacts only.

ingest -> validate -> features -> train_retrieval -> train_ranking -> evaluate -> score -> publish
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger
from prefect.artifacts import create_table_artifact

from schemas.config import PipelineConfig
from tasks.evaluate import end_run, evaluate_task, log_run_data, start_run, tracking_uri
from tasks.features import features_task
from tasks.ingest import ingest_task
from tasks.ranking import train_ranking_task
from tasks.retrieval import train_retrieval_task
from tasks.score import publish_task, score_task
from tasks.validate import validate_task
from tasks.workspace import clean_temp


@flow(name="recflow-nightly")
def nightly(config: PipelineConfig = PipelineConfig()) -> dict:
    """Ingest, validate, featurise, train, evaluate, score and publish one run date."""
    logger = get_run_logger()
    run_date, workspace = config.resolved_run_date(), config.workspace_path()
    workspace.mkdir(parents=True, exist_ok=True)
    clean_temp(workspace)
    timings: dict[str, float] = {}

    def timed(name, task, *args):
        started = time.perf_counter()
        logger.info("stage %s: started", name)
        result = task(*args)
        timings[f"time_{name}_s"] = round(time.perf_counter() - started, 2)
        logger.info("stage %s: done in %.1f s", name, timings[f"time_{name}_s"])
        return result

    started = time.perf_counter()
    staged = timed("ingest", ingest_task, config.source, run_date, workspace, config.synthetic, config.seed)
    snapshot = timed("validate", validate_task, staged, workspace, run_date, config.validation)
    params = _flatten(config.model_dump(mode="json", exclude={"run_date", "workspace"})) | {"run_date": run_date}
    run_id = start_run(workspace, config.mlflow_experiment, run_date, config.source, snapshot.data_hash, params)
    try:
        feature_set = timed("features", features_task, snapshot, workspace, run_date, config.features)
        models = workspace / "models" / run_id
        retrieval = timed(
            "train_retrieval", train_retrieval_task, feature_set, models, config.retrieval, config.features, config.seed
        )
        ranking = timed(
            "train_ranking", train_ranking_task, feature_set, retrieval.path, models / "ranking",
            config.ranking, config.retrieval, config.seed,
        )
        decision = timed("evaluate", evaluate_task, feature_set, models, run_id, workspace, config.retrieval.candidates)
        scored = timed(
            "score", score_task, feature_set, decision, workspace, run_date, config.retrieval.candidates, config.top_k
        )
        manifest = {"run_date": run_date.isoformat(), "mlflow_run_id": run_id, "model_version": decision.model_version}
        published = timed("publish", publish_task, scored, workspace, run_date, manifest)
        timings["time_total_s"] = round(time.perf_counter() - started, 2)
        log_run_data(
            workspace,
            run_id,
            timings
            | {f"retrieval_{k}": v for k, v in retrieval.metrics.items()}
            | {f"ranking_{k}": v for k, v in ranking.metrics.items()}
            | {"retrieval_epochs": retrieval.epochs, "output_rows": published.rows, "output_users": published.users}
            | {"data_interactions": snapshot.n_interactions, "data_users": snapshot.n_users, "data_items": snapshot.n_items}
            | {f"data_{split}_events": size for split, size in feature_set.split_sizes.items()},
            {"validation": snapshot.path / "validation"},
        )
    except BaseException:
        end_run(workspace, run_id, failed=True)
        raise
    end_run(workspace, run_id)
    summary = {
        "run_date": run_date.isoformat(),
        "mlflow_run_id": run_id,
        "tracking_uri": tracking_uri(workspace),
        "champion": decision.reason,
        "promoted": decision.promoted,
        "model_version": decision.model_version,
        "output": str(published.path),
        "rows": published.rows,
        "users": published.users,
        **{k: round(v, 4) for k, v in decision.metrics.items() if "ndcg" in k or "recall" in k},
        **timings,
    }
    create_table_artifact(
        [{"key": k, "value": str(v)} for k, v in summary.items()], key="nightly-summary", description="recflow run"
    )
    logger.info("published %s: %d users, %d rows; %s", published.path, published.users, published.rows, decision.reason)
    return summary


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
