"""The list-health gate: tonight's lists against the last published ones, before publishing.

Between the score and publish stages of the nightly DAG. The champion gate compares
held-out metrics; this stage looks at the lists themselves, so a fault in scoring or in a
feature join (every user handed the same items, half the lists dropped, lists that changed
completely since last night) is caught before customers see it. Each figure is measured
every night, logged to MLflow (metrics `lists_*`) and shown in the Prefect UI (artifact
`list-health`) and by `recflow runs`; a figure past its threshold (config `monitoring:`)
fails the run in one line, emits the Prefect event `recflow.lists.unhealthy` (which an
automation of infra/automations.yaml turns into a notification) and leaves last night's
partition the current one.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import polars as pl

from schemas.config import MonitoringConfig, Run
from schemas.tables import ListHealth, ScoringJob
from tasks.features import load_features
from tasks.stage import stage
from tasks.workspace import RecflowError

log = logging.getLogger(__name__)

EVENT = "recflow.lists.unhealthy"
PSI_BINS = 10


class ListsUnhealthy(RecflowError):
    """Tonight's lists broke a list-health threshold; the message names each figure."""


def last_published(workspace: Path, run_date) -> Path | None:
    """The latest readable recommendations partition before `run_date` (None: the first
    night). One that cannot be read (damaged by hand: publishing is atomic) is passed over
    with a warning."""
    earlier = sorted((p for p in (workspace / "recommendations").glob("run_date=*")
                      if p.name.removeprefix("run_date=") < run_date.isoformat()), reverse=True)
    for path in earlier:
        try:
            if [pl.read_parquet_schema(part) for part in path.glob("*.parquet")]:
                return path
        except (OSError, pl.exceptions.PolarsError) as error:
            log.warning("list health: passing over %s, which cannot be read (%s)", path, error)
    return None


def figures(tonight: pl.DataFrame, previous: pl.DataFrame | None, popularity: pl.DataFrame, n_users: int,
            n_servable: int, top_k: int) -> dict[str, float]:
    """The health figures of `tonight`'s lists (user_id, item_id, score rows) against
    `previous` (the last published lists; None on the first night). `popularity` holds
    (item_id, events) over the night's visible events; `n_users` users should each have
    min(top_k, n_servable) items."""
    full = min(top_k, n_servable)
    lengths = tonight.group_by("user_id").len()
    complete = lengths.filter(pl.col("len") >= full).height
    found = {
        "short_lists": 1 - complete / max(n_users, 1),  # short or missing
        "coverage": tonight["item_id"].n_unique() / max(n_servable, 1),
        "popularity_ratio": _popularity_ratio(tonight, popularity),
    }
    if previous is None:
        return found
    sets = [frame.group_by("user_id").agg(pl.col("item_id").alias(name))
            for frame, name in ((tonight, "tonight"), (previous, "before"))]
    common = sets[0].join(sets[1], on="user_id")
    shared = common.select(
        pl.col("tonight").list.set_intersection("before").list.len().alias("shared"),
        pl.col("tonight").list.set_union("before").list.len().alias("union"),
    )
    jaccard = shared["shared"] / shared["union"].clip(1)
    before_coverage = previous["item_id"].n_unique() / max(n_servable, 1)
    before_popularity = _popularity_ratio(previous, popularity)
    return found | {
        "users_compared": float(common.height),
        "new_lists": float((shared["shared"] == 0).mean()) if common.height else 0.0,
        "overlap": float(jaccard.mean()) if common.height else 1.0,
        "coverage_change": found["coverage"] / before_coverage if before_coverage else 1.0,
        "popularity_change": found["popularity_ratio"] / before_popularity if before_popularity else 1.0,
        "score_psi": psi(previous["score"].to_numpy(), tonight["score"].to_numpy()),
    }


def _popularity_ratio(lists: pl.DataFrame, popularity: pl.DataFrame) -> float:
    """Mean popularity of the listed items over the mean popularity of an event's item:
    1 when lists look like the traffic, higher when they lean on the head."""
    counts = popularity["events"].cast(pl.Float64)
    per_event = float((counts**2).sum() / counts.sum()) if counts.sum() else 0.0
    listed = lists.select("item_id").join(popularity, on="item_id", how="left")["events"].fill_null(0)
    return float(listed.mean()) / per_event if per_event and listed.len() else 0.0


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = PSI_BINS) -> float:
    """Population stability index of `actual` against `expected`, over `expected`'s
    deciles (a share of 0 counts as 0.0001)."""
    if expected.size == 0 or actual.size == 0:
        return 0.0
    edges = np.unique(np.quantile(expected, np.linspace(0, 1, bins + 1)[1:-1]))
    shares = [np.bincount(np.searchsorted(edges, values, side="right"), minlength=edges.size + 1) / values.size
              for values in (expected, actual)]
    before, after = (np.maximum(share, 1e-4) for share in shares)
    return float(np.sum((after - before) * np.log(after / before)))


def breaches(found: dict[str, float], cfg: MonitoringConfig, top_k: int) -> list[str]:
    """One phrase per figure past its threshold (None thresholds are not checked)."""
    checks = [  # figure, threshold, whether the figure must stay at or below it, how it reads
        ("short_lists", cfg.max_short_lists, True, "share of users with fewer than {k} items"),
        ("new_lists", cfg.max_new_lists, True, "share of users whose top-{k} is entirely new"),
        ("overlap", cfg.min_overlap, False, "mean Jaccard@{k} with the last published lists"),
        ("coverage_change", cfg.min_coverage_change, False, "coverage@{k} over the last published lists'"),
        ("popularity_change", cfg.max_popularity_change, True, "popularity ratio over the last published lists'"),
        ("score_psi", cfg.max_score_psi, True, "PSI of the scores against the last published lists'"),
    ]
    found_breaches = []
    for name, threshold, at_most, reads in checks:
        value = found.get(name)
        if value is None or threshold is None or (value <= threshold if at_most else value >= threshold):
            continue
        bound = f"max_{name}" if at_most else f"min_{name}"
        found_breaches.append(f"{name} {value:.4f} ({reads.format(k=top_k)}) is {'above' if at_most else 'below'} "
                              f"monitoring.{bound} {threshold:g}")
    return found_breaches


def check_lists(run: Run, job: ScoringJob, run_id: str) -> ListHealth:
    """Measure tonight's staged lists against the last published partition, log the
    figures to tonight's MLflow run, and return them with the thresholds they break (the
    task, `_check_and_report`, turns a breach into the event and the error)."""
    from tasks.tracking import log_metrics

    cfg = run.config
    features = load_features(job.features.path)
    previous_path = last_published(run.workspace, run.run_date)
    columns = ["user_id", "item_id", "score"]
    tonight = pl.read_parquet(job.path / "*.parquet", columns=columns)
    previous = pl.read_parquet(previous_path / "*.parquet", columns=columns) if previous_path else None
    popularity = features.events.group_by("item_idx").len("events").join(
        features.items.select("item_idx", "item_id"), on="item_idx").select("item_id", "events")
    found = figures(tonight, previous, popularity, features.n_users, int(features.servable.sum()), cfg.top_k)
    compared = previous_path.name.removeprefix("run_date=") if previous_path else None
    health = ListHealth(figures={k: round(v, 6) for k, v in found.items()}, compared_with=compared,
                        breaches=breaches(found, cfg.monitoring, cfg.top_k))
    log_metrics(run.workspace, run_id, health.metrics())
    if compared is None:
        log.info("list health: no earlier partition to compare with (first night); short lists %.4f, coverage %.4f",
                 found["short_lists"], found["coverage"])
    else:
        log.info("list health against %s: %s", compared, ", ".join(f"{k} {v:.4f}" for k, v in found.items()))
    return health


def _check_and_report(run: Run, job: ScoringJob, run_id: str) -> ListHealth:
    """`check_lists`, with its figures as the run's `list-health` artifact in the Prefect
    UI, and on a breach the event for the automation, then the one-line error."""
    from prefect.artifacts import create_table_artifact

    health = check_lists(run, job, run_id)
    thresholds = run.config.monitoring.model_dump()
    create_table_artifact(
        [{"figure": name, "tonight": f"{value:.4f}",
          "threshold": str(thresholds.get(f"max_{name}", thresholds.get(f"min_{name}", ""))),
          "breached": "yes" if any(b.startswith(f"{name} ") for b in health.breaches) else ""}
         for name, value in health.figures.items()],
        key="list-health",
        description=f"tonight's lists against {health.compared_with or 'nothing (first night)'}",
    )
    if health.breaches:
        _emit(run, health)
        against = f"the lists of {health.compared_with}" if health.compared_with else "no earlier lists"
        raise ListsUnhealthy(f"list health: {'; '.join(health.breaches)} (against {against}); nothing published"
                             + (f", {health.compared_with} stays current" if health.compared_with else ""))
    return health


def _emit(run: Run, health: ListHealth) -> None:
    """The Prefect event of a breach, related to this flow run (what the automation's
    notification links to)."""
    from prefect.events import emit_event
    from prefect.runtime import flow_run

    related = []
    if flow_run.id:
        related.append({"prefect.resource.id": f"prefect.flow-run.{flow_run.id}", "prefect.resource.role": "flow-run",
                        "prefect.resource.name": flow_run.name})
    emit_event(EVENT, resource={"prefect.resource.id": f"recflow.lists.{run.workspace}",
                                "prefect.resource.name": f"recflow lists in {run.workspace}"},
               related=related, payload={"run_date": run.run_date.isoformat(), "breaches": health.breaches,
                                         "compared_with": health.compared_with, "figures": health.figures})


check_lists_task = stage("check_lists", _check_and_report)
