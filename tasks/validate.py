"""Validation: the Great Expectations gate between ingestion and everything else.

Second stage of the nightly DAG. It runs the suites of schemas/suites.py on the staged
snapshot. On success the snapshot is published to snapshots/run_date=.../ with the GE
result (JSON) and Data Docs (HTML) beside it. On failure the staged files and the result
go to quarantine/run_date=.../ and the run stops with an error naming each failed
expectation, the file and a sample of offending values; nothing downstream is written.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import warnings
from pathlib import Path

import polars as pl

from schemas.config import Run, ValidationConfig
from schemas.tables import INTERACTIONS_REQUIRED, STAGE_RECORD, Snapshot
from tasks.stage import stage
from tasks.workspace import RecflowError, publish_dir, reuse, stamp, temp_dir, write_json

log = logging.getLogger(__name__)

# Interaction rows per validation of the row checks: Great Expectations' memory follows the
# slice, not the table (at 30M events the whole table took about 10 GB).
SLICE_ROWS = 2_000_000


class ValidationFailed(RecflowError):
    """Input broke one or more expectations; the message lists them."""

    def __init__(self, message: str, failures: list[dict]):
        super().__init__(message)
        self.failures = failures


def validate(run: Run, snapshot: Snapshot) -> Snapshot:
    """Validate the staged snapshot and publish it; or quarantine it and raise
    ValidationFailed. A snapshot an earlier run of this date already validated (same key)
    is reused as it is."""
    if (found := reuse(run.partition("snapshots"), snapshot.key, Snapshot)) is not None:
        return found
    failures = run_suites(snapshot, run.run_date, run.config.validation, previous_snapshot(run.workspace, run.run_date))
    if failures:
        target = run.partition("quarantine")
        write_json(failures, snapshot.path / "reasons.json")
        publish_dir(snapshot.path, target)
        lines = [f"{f['file']}: {f['expectation']}({f['column']}): {f['detail']}" for f in failures]
        raise ValidationFailed(
            f"validation failed, {len(failures)} expectation(s) broken (details in {target}): " + "; ".join(lines),
            failures,
        )
    if snapshot.rejected.exists():  # rows set apart by ingestion's bad-row policy, each with its reason
        staging = temp_dir(run.workspace, "quarantine")
        os.rename(snapshot.rejected, staging / "rows.parquet")
        publish_dir(staging, run.partition("quarantine"))
    published = snapshot.model_copy(update={"path": run.partition("snapshots")})
    stamp(snapshot.path, published)
    publish_dir(snapshot.path, published.path)
    return published


def previous_snapshot(workspace: Path, run_date: dt.date) -> Snapshot | None:
    """The latest validated snapshot before `run_date`, what tonight's drift and volume are
    measured against."""
    earlier = sorted(
        (path for path in (workspace / "snapshots").glob("run_date=*") if path.name.removeprefix("run_date=") < str(run_date)),
        reverse=True,
    )
    for path in earlier:
        try:
            record = json.loads((path / STAGE_RECORD).read_text())["record"]
            found = Snapshot.model_validate(record | {"path": path})
        except (OSError, ValueError, KeyError):
            continue
        if found.interactions.exists():
            return found
    return None


def drift(snapshot: Snapshot, interactions: pl.DataFrame, items: pl.DataFrame | None,
          previous: Snapshot) -> dict[str, pl.DataFrame]:
    """What tonight's input is compared with `previous` on, as frames for the drift suite:
    `events` (per event: of an item and, when both nights' user ids are comparable, from a
    user that `previous` did not hold), `users` (each user's events, as a power-of-two
    bucket), `categories` (the categories of a sample of events, when both nights have an
    items table); and the same distributions of `previous` (`reference_*`, label ->
    events)."""
    before = pl.read_parquet(previous.interactions, columns=["user_id", "item_id"])
    new = [(~pl.col("item_id").is_in(before["item_id"].unique().implode())).cast(pl.Int8).alias("new_item")]
    if snapshot.pseudonym_key == previous.pseudonym_key:
        new.append((~pl.col("user_id").is_in(before["user_id"].unique().implode())).cast(pl.Int8).alias("new_user"))
    else:
        log.info("validation: user ids are pseudonyms of another key than %s's: new users not counted",
                 previous.path.name.removeprefix("run_date="))
    frames = {
        "events": interactions.select(new),
        "users": _per_user(interactions),
        "reference_users": _per_user(before).group_by("bucket").len(),
    }
    if items is not None and previous.has_items and previous.items.exists():
        frames["categories"] = _categories(interactions, items)
        before_items = pl.read_parquet(previous.items, columns=["item_id", "categories"])
        frames["reference_categories"] = _categories(before, before_items).group_by("category").len()
    return frames


DRIFT_SAMPLE = 200_000  # events whose categories the category mix is measured on


def _per_user(interactions: pl.DataFrame) -> pl.DataFrame:
    """One row per user: the power-of-two bucket of their event count ("4-7")."""
    low = (2 ** pl.len().log(2).floor()).cast(pl.Int64)
    return interactions.group_by("user_id").agg(
        pl.format("{}-{}", low, 2 * low - 1).alias("bucket")).select("bucket")


def _categories(interactions: pl.DataFrame, items: pl.DataFrame) -> pl.DataFrame:
    """The categories of (a seeded sample of) the events, one row per event and category."""
    sample = interactions.select("item_id")
    if sample.height > DRIFT_SAMPLE:
        sample = sample.sample(DRIFT_SAMPLE, seed=0)
    return (sample.join(items.select("item_id", "categories"), on="item_id").explode("categories")
            .select(pl.col("categories").alias("category")).drop_nulls())


def run_suites(snapshot: Snapshot, run_date: dt.date, cfg: ValidationConfig, previous: Snapshot | None = None) -> list[dict]:
    """Run every suite on the snapshot (with `previous`, the latest earlier snapshot, the
    volume and drift checks too); write results and Data Docs beside it
    (`Snapshot.validation`: a `<table>.json` each; `interaction_rows.<n>.json` for the n-th
    slice of SLICE_ROWS interactions when there are several); return the failures, each
    described once over the slices."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    from schemas.rules import servable_catalogue, serving_moment
    from schemas.suites import (catalogue_suite, drift_suites, exclusions_suite, interaction_rows_suite,
                                interactions_suite, items_suite)

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="great_expectations")
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False, "metric_calculations": False}
    context.add_data_docs_site(
        site_name="recflow",
        site_config={
            "class_name": "SiteBuilder",
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(snapshot.validation / "docs")},
        },
    )
    source = context.data_sources.add_pandas(name="snapshot")
    items = pl.read_parquet(snapshot.items) if snapshot.has_items else None
    interactions = pl.read_parquet(snapshot.interactions)
    volume = (previous.path.name.removeprefix("run_date="), previous.n_interactions) if previous else None
    item_ids = items["item_id"].drop_nulls().unique().to_list() if items is not None else None
    hidden = _without_user_ids(interactions)
    whole = hidden.select(pl.col(c).cast(pl.Categorical) if c != "timestamp" else c
                          for c in INTERACTIONS_REQUIRED if c in hidden.columns)
    tables = [
        ("interactions", [whole], interactions_suite(cfg, run_date, item_ids, volume)),
        ("interaction_rows", [hidden.slice(start, SLICE_ROWS) for start in range(0, max(hidden.height, 1), SLICE_ROWS)],
         interaction_rows_suite(cfg, run_date)),
    ]
    if items is not None:
        tables.append(("items", [items.select("item_id")], items_suite()))
    exclusions = pl.read_parquet(snapshot.exclusions) if snapshot.exclusions.exists() else None
    if exclusions is not None:  # its user ids are never handed to GE (its results quote values)
        tables.append(("exclusions", [exclusions.select("item_id", "until")], exclusions_suite()))
    catalogue = items if items is not None else interactions.select("item_id").unique()
    servable = servable_catalogue(catalogue, exclusions, serving_moment(run_date)).select(pl.col("servable").cast(pl.Int8))
    tables.append(("catalogue", [servable], catalogue_suite(run_date)))
    if previous is not None and interactions.height:  # (no rows: the row count already fails)
        frames = drift(snapshot, interactions, items, previous)
        tables += [(f"drift_{name}", [frames[name]], suite) for name, suite in drift_suites(cfg, volume[0], frames).items()]
    del interactions, hidden, whole
    failures = []
    for name, slices, suite in tables:
        batch = source.add_dataframe_asset(name=name).add_batch_definition_whole_dataframe("all")
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=context.suites.add(suite))
        )
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=name,
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["recflow"])],
                result_format={"result_format": "SUMMARY", "partial_unexpected_count": 5},
            )
        )
        results = []
        for number, frame in enumerate(slices, 1):
            frame_pd = _pandas(frame)
            result = next(iter(checkpoint.run(batch_parameters={"dataframe": frame_pd}).run_results.values()))
            del frame_pd
            write_json(result.to_json_dict(), snapshot.validation / (f"{name}.json" if len(slices) == 1 else
                                                                     f"{name}.{number}.json"))
            results.append(result)
        slices.clear()
        file = snapshot.origin.get("items" if snapshot.has_items else "interactions") if name == "catalogue" else \
            snapshot.origin.get("interactions") if name.startswith(("drift_", "interaction")) else None
        failures += _failures(results, file or snapshot.origin.get(name, name))
    log.info("validation: %d failed expectation(s)", len(failures))
    return failures


def _pandas(frame: pl.DataFrame):
    """`frame` as GE reads it: pandas, strings as Arrow strings, categories as pandas
    categories (which GE's pandas engine compares by their codes)."""
    return frame.to_pandas(use_pyarrow_extension_array=pl.Categorical not in frame.dtypes)


def _without_user_ids(interactions: pl.DataFrame) -> pl.DataFrame:
    """`interactions` with each user id replaced by a stand-in ("user#17") that keeps what
    the suite checks (nulls, blank ids, which rows share a user), so GE's results and Data
    Docs, which quote sample values, never hold a user id."""
    kept = pl.col("user_id").is_null() | (pl.col("user_id").str.strip_chars() == "")
    stand_in = pl.format("user#{}", pl.col("user_id").rank("dense").cast(pl.String))
    return interactions.with_columns(pl.when(kept).then(pl.col("user_id")).otherwise(stand_in).alias("user_id"))


def _failures(results: list, file: str) -> list[dict]:
    """The failed expectations of one table's results (one result per slice of it), each
    described once, over every slice: offending rows summed, samples from the first."""
    slices = list(zip(*(result.results for result in results)))  # an expectation's result in each slice
    return [_describe(outcomes, file) for outcomes in slices if not all(o.success for o in outcomes)]


def _describe(outcomes: tuple, file: str) -> dict:
    """One failed expectation, from its results in every slice."""
    first = next(o for o in outcomes if not o.success)
    config = first.expectation_config
    column = config.kwargs.get("column") or ",".join(config.kwargs.get("column_list") or []) or "table"
    if first.exception_info.get("raised_exception"):
        detail = first.exception_info.get("exception_message", "could not be evaluated")
    elif "unexpected_count" in first.result:
        # user ids may be personal data (emails, account numbers): counted, never echoed
        private = "user_id" in column
        offending = sum(o.result.get("unexpected_count", 0) for o in outcomes)
        judged = sum(o.result.get("element_count", 0) - o.result.get("missing_count", 0) for o in outcomes)
        sample = [] if private else [str(v) for o in outcomes for v in (o.result.get("partial_unexpected_list") or [])][:3]
        detail = (
            f"{offending} offending row(s) ({100 * offending / max(judged, 1):.2f}%)"
            + (f", e.g. {', '.join(sample)}" if sample else "")
        )
    else:
        observed = first.result.get("observed_value")
        observed = f"{float(observed):.4g}" if isinstance(observed, (int, float)) else repr(observed)
        detail = f"observed {observed}, expected {_expected(config.kwargs)}"
    if (config.meta or {}).get("check"):
        detail = f"{config.meta['check']}: {detail}"
    return {"file": file, "expectation": config.type, "column": column, "detail": detail}


def _expected(kwargs: dict) -> str:
    bounds = {k: v for k, v in kwargs.items() if k in ("min_value", "max_value", "value_set", "threshold")
              and v is not None}
    return ", ".join(f"{k}={v}" for k, v in bounds.items()) or "the column to exist"


def summary_markdown(failures: list[dict], snapshot: Snapshot) -> str:
    status = "passed" if not failures else f"FAILED ({len(failures)} expectation(s))"
    lines = [
        f"# Validation {status}",
        "",
        f"Source `{snapshot.source}`: {snapshot.n_interactions} interactions, {snapshot.n_users} users, "
        f"{snapshot.n_items} items (data hash `{snapshot.data_hash}`).",
    ]
    if failures:
        lines += ["", "| file | expectation | column | detail |", "|---|---|---|---|"]
        lines += [f"| {f['file']} | {f['expectation']} | {f['column']} | {f['detail']} |" for f in failures]
    return "\n".join(lines)


def _validate_and_report(run: Run, snapshot: Snapshot) -> Snapshot:
    """`validate`, with its summary as the run's `validation` artifact in the Prefect UI."""
    from prefect.artifacts import create_markdown_artifact

    try:
        published = validate(run, snapshot)
    except ValidationFailed as error:
        create_markdown_artifact(summary_markdown(error.failures, snapshot), key="validation", description="GE gate")
        raise
    create_markdown_artifact(summary_markdown([], published), key="validation", description="GE gate")
    return published


validate_task = stage("validate", _validate_and_report)
