"""The nightly DAG as one Prefect flow, and the backfill flow that replays it over past
dates: wiring, parameters and artifacts only.

ingest -> validate -> features -> train_retrieval -> select -> train_ranking -> evaluate -> score
-> check_lists -> publish -> catalogue -> cleanup

Every stage is a task (tasks/<stage>.py) that takes the run and its upstream records and
returns a record; a stage whose output an earlier run already computed from the same
input, config and code reuses it and says so.
"""

from __future__ import annotations

import datetime as dt
import time

from prefect import flow, get_run_logger, unmapped
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from schemas.config import PipelineConfig, Run
from schemas.tables import ChampionDecision, Cleanup, FeatureSet, ScoredShard, ScoringJob, StageRecord
from tasks.catalogue import catalogue_task
from tasks.cleanup import cleanup_task
from tasks.evaluate import evaluate_task
from tasks.featurize import features_task
from tasks.health import check_lists_task
from tasks.ingest import ingest_task
from tasks.ranking import train_ranking_task
from tasks.retrieval import train_retrieval_task
from tasks.score import prepare_scoring_task, publish_task, score_shard_task
from tasks.select import select_task
from tasks.tracking import check_tracking, end_run, log_outcome, lost_server, run_link, runs_link, start_run
from tasks.validate import validate_task
from tasks.workspace import RecflowError, clean_temp, locked


@flow(name="recflow-nightly")
def nightly(config: PipelineConfig = PipelineConfig()) -> dict:
    """Ingest, validate, featurise, train, evaluate, score and publish one run date."""
    run = Run.of(_over_deployment_defaults(config))
    check_tracking(run.workspace)
    with locked(run.workspace):  # one run per workspace at a time
        clean_temp(run.workspace)
        started = time.perf_counter()
        staged = ingest_task(run=run)
        snapshot = validate_task(run=run, snapshot=staged)
        run_id = start_run(run, snapshot)
        try:
            features = features_task(run=run, snapshot=snapshot)
            retrieval = train_retrieval_task(run=run, features=features)
            selection = select_task(run=run, features=features, retrieval=retrieval)
            models = train_ranking_task(run=run, features=features, retrieval=retrieval, selection=selection)
            decision = evaluate_task(run=run, features=features, models=models, run_id=run_id)
            job, shards = _score(run=run, features=features, decision=decision)
            health = check_lists_task(run=run, job=job, run_id=run_id)
            published = publish_task(run=run, job=job, shards=shards, run_id=run_id)
            catalogue = catalogue_task(run=run, snapshot=snapshot, features=features, decision=decision)
            stages = {"ingest": staged, "validate": snapshot, "features": features, "train_retrieval": retrieval,
                      "select": selection, "train_ranking": models, "evaluate": decision, "score": job,
                      "check_lists": health, "publish": published, "catalogue": catalogue}
            seconds = time.perf_counter() - started
            log_outcome(run.workspace, run_id, stages, seconds, artifacts={"validation": snapshot.validation})
        except BaseException as error:
            end_run(run.workspace, run_id, failed=True)
            lost = lost_server(run.workspace, error)
            if lost:
                raise lost from None
            raise
        end_run(run.workspace, run_id)
        cleanup = cleanup_task(run=run, keep=decision.models)
    summary = _summary(run, run_id, stages, seconds, cleanup)
    _artifacts(summary, decision)
    get_run_logger().info("published %s: %d users, %d rows; %s", published.path, published.users, published.rows,
                          decision.reason)
    return summary


@flow(name="recflow-backfill")
def backfill(start: dt.date, end: dt.date, config: PipelineConfig = PipelineConfig()) -> list[dict]:
    """Run the nightly flow for each date from `start` to `end`, oldest first.

    Each date is its own nightly run (a subflow): it sees only interactions up to that
    date and writes that date's partition and MLflow run.
    """
    if end < start:
        raise RecflowError(f"backfill end {end} is before its start {start}")
    config = _over_deployment_defaults(config)
    dates = [start + dt.timedelta(days=offset) for offset in range((end - start).days + 1)]
    get_run_logger().info("backfill of %d date(s): %s .. %s", len(dates), start, end)
    return [nightly.with_options(flow_run_name=f"nightly-{day}")(config.model_copy(update={"run_date": day}))
            for day in dates]


def _over_deployment_defaults(config: PipelineConfig) -> PipelineConfig:
    """Prefect replaces a deployment's `config` parameter whole: a run asked for with
    `--param config='{"top_k": 7}'` would lose the deployment's workspace and source. The
    fields a run gives are laid over the deployment's config instead (a run outside a
    deployment, or a subflow, keeps its config as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import deployment

    if deployment.id is None:
        return config
    with get_client(sync_client=True) as client:
        defaults = client.read_deployment(deployment.id).parameters.get("config") or {}
    return config.over(defaults)


def _score(run: Run, features: FeatureSet, decision: ChampionDecision) -> tuple[ScoringJob, list[ScoredShard]]:
    """Scoring fans out: user-range shards run in parallel on the flow's task runner
    (threads, or Dask workers). The score stage's seconds are the preparation's plus the
    slowest shard's."""
    job = prepare_scoring_task(run=run, features=features, decision=decision)
    shards = score_shard_task.map(run=unmapped(run), job=unmapped(job), shard=range(run.config.shards)).result()
    return job.model_copy(update={"seconds": round(job.seconds + max(shard.seconds for shard in shards), 2)}), shards


def _summary(run: Run, run_id: str, stages: dict[str, StageRecord], seconds: float, cleanup: Cleanup) -> dict:
    """What `recflow run` prints and the Prefect UI shows: where the lists went and why."""
    decision, published = stages["evaluate"], stages["publish"]
    return {
        "run_date": run.run_date.isoformat(),
        "nightly_run_id": run_id,
        "mlflow_run": run_link(run.workspace, run_id),
        "mlflow_runs": runs_link(run.workspace, run_id),
        "model_key": stages["train_ranking"].key,
        "champion": decision.reason,
        "promoted": decision.promoted,
        "model_version": decision.model_version,
        "output": str(published.path),
        "rows": published.rows,
        "users": published.users,
        "users_filled": published.users_filled,
        "lists_compared_with": stages["check_lists"].compared_with,
        **{f"lists_{name}": value for name, value in stages["check_lists"].figures.items()},
        "reused_stages": [name for name, record in stages.items() if record.reused],
        "privacy_partitions_rewritten": cleanup.rewritten,
        "privacy_directories_removed": cleanup.removed,
        "retention_partitions_pruned": len(cleanup.pruned),
        **{k: round(v, 4) for k, v in decision.metrics.items() if "ndcg" in k or "recall" in k},
        **{f"time_{name}_s": record.seconds for name, record in stages.items()},
        "time_total_s": round(seconds, 2),
    }


def _artifacts(summary: dict, decision: ChampionDecision) -> None:
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
    if summary["mlflow_run"].startswith("http"):
        create_link_artifact(summary["mlflow_run"], link_text="MLflow run", key="mlflow-run",
                             description="this run in MLflow")
        create_link_artifact(summary["mlflow_runs"], link_text="MLflow runs", key="mlflow-runs",
                             description="every night side by side: date, NDCG@10, recall@10, coverage, decision")
    create_table_artifact(
        [{"key": k, "value": str(v)} for k, v in summary.items()], key="nightly-summary", description="recflow run"
    )


def _cell(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"
