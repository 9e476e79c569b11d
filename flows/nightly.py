"""The nightly DAG as one Prefect flow, and the backfill flow that replays it over past
dates: wiring, parameters and artifacts only.

ingest -> validate -> features -> train_retrieval -> train_ranking -> evaluate -> score -> publish -> catalogue
"""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from schemas.config import PipelineConfig
from schemas.tables import ChampionDecision, FeatureSet, ModelSet, PublishedTable, Snapshot
from tasks import privacy
from tasks.catalogue import catalogue_task
from tasks.evaluate import champion_models, check_tracking, end_run, evaluate_task, log_run_data, run_link, start_run
from tasks.features import features_task
from tasks.ingest import fingerprint, ingest_task
from tasks.ranking import train_ranking_task
from tasks.retrieval import train_retrieval_task
from tasks.score import prepare_task, publish_task, score_shard_task
from tasks.validate import summary_markdown, validate_task
from tasks.workspace import RecflowError, clean_temp, code_version, locked, partition, publish_dir, reuse, stage_key, stamp, temp_dir


STAGES = ("ingest", "validate", "features", "train_retrieval", "train_ranking", "evaluate", "score", "publish",
          "catalogue")


@flow(name="recflow-nightly")
def nightly(config: PipelineConfig = PipelineConfig()) -> dict:
    """Ingest, validate, featurise, train, evaluate, score and publish one run date.

    Each stage's output is stamped with a hash of everything it was computed from; a rerun
    whose inputs, config and code are unchanged reuses it instead of recomputing.
    """
    logger = get_run_logger()
    run_date, workspace = config.resolved_run_date(), config.workspace_path()
    check_tracking(workspace)
    with locked(workspace):  # one run per workspace at a time
        clean_temp(workspace)
        timings: dict[str, float] = {}
        reused: list[str] = []

        def timed(name, task, *args):
            started = time.perf_counter()
            logger.info("stage %s: started", name)
            result = task(*args)
            timings[f"time_{name}_s"] = round(time.perf_counter() - started, 2)
            logger.info("stage %s: done in %.1f s", name, timings[f"time_{name}_s"])
            return result

        def cached(stages, path, key, record_type, compute):
            found = reuse(path, key, record_type)
            if found is None:
                return compute()
            reused.extend(stages)
            logger.info("stages %s: reused %s (same input, config and code: key %s)", ", ".join(stages), path, key)
            return found

        started = time.perf_counter()
        snapshot_key = stage_key(
            "snapshot", fingerprint(config.source, run_date, config.synthetic, config.seed), config.validation,
            privacy.fingerprint(config.privacy, workspace), code_version(),
        )
        snapshot = cached(
            ["ingest", "validate"], partition(workspace, "snapshots", run_date), snapshot_key, Snapshot,
            lambda: timed(
                "validate", validate_task,
                timed("ingest", ingest_task, config.source, run_date, workspace, config.synthetic, config.seed,
                      config.validation, config.privacy),
                workspace, run_date, config.validation, snapshot_key,
            ),
        )
        create_markdown_artifact(summary_markdown([], snapshot), key="validation", description="GE gate")
        params = _flatten(config.model_dump(mode="json", exclude={"run_date", "workspace"})) | {"run_date": run_date}
        run_id = start_run(workspace, config.mlflow_experiment, run_date, config.source, snapshot.data_hash, params)
        try:
            feature_key = stage_key("features", snapshot_key, config.features)
            feature_set = cached(
                ["features"], partition(workspace, "features", run_date), feature_key, FeatureSet,
                lambda: timed("features", features_task, snapshot, workspace, run_date, config.features, feature_key),
            )
            champion = champion_models(workspace)
            retire = champion is not None and privacy.remembers(champion, config.privacy, workspace)
            warm = champion if config.retrieval.warm_start and not retire else None
            models_key = stage_key(
                "models", feature_key, config.retrieval, config.ranking, config.seed, warm.name if warm else None
            )
            models = cached(
                ["train_retrieval", "train_ranking"], workspace / "models" / models_key, models_key, ModelSet,
                lambda: _train(config, feature_set, workspace, models_key, warm, timed),
            )
            decision = timed(
                "evaluate", evaluate_task, feature_set, feature_key, models, run_id, workspace,
                config.retrieval.candidates, config.lists, retire,
            )
            output_key = stage_key(
                "recommendations", feature_key, decision.models_path.name, decision.model_version, decision.mlflow_run_id,
                config.top_k, config.retrieval.candidates, config.lists,
            )
            manifest = {"run_date": run_date.isoformat(), "mlflow_run_id": run_id, "model_version": decision.model_version}
            published = cached(
                ["score", "publish"], partition(workspace, "recommendations", run_date), output_key, PublishedTable,
                lambda: timed(
                    "publish", publish_task,
                    timed("score", _score, config, feature_set, decision, workspace, run_date),
                    workspace, run_date, manifest, output_key,
                ),
            )
            catalogue = timed("catalogue", catalogue_task, snapshot, feature_set, decision, workspace, run_date,
                              config.top_k, config.similar_items, config.popularity_half_life_days)
            timings["time_total_s"] = round(time.perf_counter() - started, 2)
            log_run_data(
                workspace,
                run_id,
                {f"time_{stage}_s": 0.0 for stage in STAGES}
                | timings
                | {f"retrieval_{k}": v for k, v in models.retrieval.metrics.items()}
                | {f"ranking_{k}": v for k, v in models.ranking.metrics.items()}
                | {"retrieval_epochs": models.retrieval.epochs, "stages_reused": len(reused)}
                | {"output_rows": published.rows, "output_users": published.users} | catalogue
                | {"data_interactions": snapshot.n_interactions, "data_users": snapshot.n_users, "data_items": snapshot.n_items}
                | {f"data_{split}_events": size for split, size in feature_set.split_sizes.items()},
                {"validation": snapshot.path / "validation"},
                {"reused_stages": ",".join(reused) or "none", "model_key": models_key,
                 "warm_start_from": warm.name if warm else "none"},
            )
        except BaseException:
            end_run(workspace, run_id, failed=True)
            raise
        end_run(workspace, run_id)
        # Only a run that succeeded removes anything: opted-out users from earlier runs' files, then old partitions.
        forgotten = privacy.forget(workspace, config.privacy, keep=decision.models_path)
        pruned = privacy.prune(workspace, run_date, config.privacy.retention_days)
        link = run_link(workspace, run_id)
        summary = {
            "run_date": run_date.isoformat(),
            "mlflow_run_id": run_id,
            "mlflow_run": link,
            "model_key": models_key,
            "champion": decision.reason,
            "promoted": decision.promoted,
            "model_version": decision.model_version,
            "output": str(published.path),
            "rows": published.rows,
            "users": published.users,
            "reused_stages": reused,
            "privacy_partitions_rewritten": forgotten["rewritten"],
            "privacy_directories_removed": forgotten["removed"],
            "retention_partitions_pruned": len(pruned),
            **{k: round(v, 4) for k, v in decision.metrics.items() if "ndcg" in k or "recall" in k},
            **timings,
        }
        _artifacts(summary, decision, link)
        logger.info("published %s: %d users, %d rows; %s", published.path, published.users, published.rows, decision.reason)
        return summary


@flow(name="recflow-backfill")
def backfill(start: dt.date, end: dt.date, config: PipelineConfig = PipelineConfig()) -> list[dict]:
    """Run the nightly flow for each date from `start` to `end`, oldest first.

    Each date is its own nightly run (a subflow): it sees only interactions up to that
    date and writes that date's partition and MLflow run.
    """
    if end < start:
        raise RecflowError(f"backfill end {end} is before its start {start}")
    dates = [start + dt.timedelta(days=offset) for offset in range((end - start).days + 1)]
    get_run_logger().info("backfill of %d date(s): %s .. %s", len(dates), start, end)
    return [nightly.with_options(flow_run_name=f"nightly-{day}")(config.model_copy(update={"run_date": day}))
            for day in dates]


def _train(config: PipelineConfig, feature_set: FeatureSet, workspace, key: str, warm, timed) -> ModelSet:
    """Train both models into a temp directory, then publish it as models/<key>/."""
    staging = temp_dir(workspace, "models")
    retrieval = timed(
        "train_retrieval", train_retrieval_task, feature_set, staging, config.retrieval, config.features, config.seed,
        warm,
    )
    ranking = timed(
        "train_ranking", train_ranking_task, feature_set, retrieval.path, staging / "ranking",
        config.ranking, config.retrieval, config.seed,
    )
    privacy.record(staging / "vocab", config.privacy, workspace)
    target = workspace / "models" / key
    models = ModelSet(
        path=target, key=key,
        retrieval=retrieval.model_copy(update={"path": target / "retrieval"}),
        ranking=ranking.model_copy(update={"path": target / "ranking"}),
    )
    stamp(staging, key, models)
    publish_dir(staging, target)
    return models


def _score(config: PipelineConfig, feature_set: FeatureSet, decision: ChampionDecision, workspace, run_date) -> Path:
    """Score user-range shards in parallel on the flow's task runner (threads, or Dask
    workers); return the temp directory holding their parts."""
    staged = prepare_task(feature_set, decision, workspace)
    shards = [
        score_shard_task.submit(feature_set, decision, staged, run_date, config.retrieval.candidates, config.top_k,
                                shard, config.shards, config.lists)
        for shard in range(config.shards)
    ]
    rows = [shard.result() for shard in shards]
    get_run_logger().info("scored %d shard(s): %d rows (flow process %d)", len(rows), sum(rows), os.getpid())
    return staged


def _artifacts(summary: dict, decision: ChampionDecision, link: str) -> None:
    """What the Prefect UI shows for a run: metrics against the champion, the decision, links."""
    names = sorted({k.removeprefix("champion_") for k in decision.metrics if not k.startswith(("retrieval_", "popularity_"))})
    columns = {"tonight": "", "retrieval only": "retrieval_", "popularity": "popularity_", "champion": "champion_"}
    rows = [
        {"metric": name, **{label: _cell(decision.metrics.get(prefix + name)) for label, prefix in columns.items()}}
        for name in names
    ]
    create_table_artifact(rows, key="metrics", description="held-out metrics@10: tonight's models against the champion")
    create_markdown_artifact(
        f"# Champion decision\n\n{'Promoted' if decision.promoted else 'Not promoted'}: {decision.reason}.\n\n"
        f"Scoring used model version {decision.model_version} (MLflow run `{decision.mlflow_run_id}`).",
        key="champion-decision", description="champion gate",
    )
    if link.startswith("http"):
        create_link_artifact(link, link_text="MLflow run", key="mlflow-run", description="this run in MLflow")
    create_table_artifact(
        [{"key": k, "value": str(v)} for k, v in summary.items()], key="nightly-summary", description="recflow run"
    )


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
