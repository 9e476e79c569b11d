"""Backfills replay past dates in order, each on the interactions it could have seen."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys

import polars as pl
from mlflow.tracking import MlflowClient

from schemas.config import PipelineConfig, SyntheticConfig
from tasks.ingest import generate_synthetic
from tests.conftest import ROOT

SMALL = SyntheticConfig(n_users=150, n_items=250, n_clusters=5, events_per_user=30, n_categories=8)
LAST_DAY = dt.date(2026, 11, 1)


def test_a_backfill_of_three_dates_writes_three_partitions_each_blind_to_later_events(prefect_server, tmp_path):
    from flows.nightly import backfill

    interactions, items = generate_synthetic(SMALL, LAST_DAY + dt.timedelta(days=10), 3)  # ends before now
    source = tmp_path / "source"
    source.mkdir()
    interactions.write_parquet(source / "interactions.parquet")
    items.write_parquet(source / "items.parquet")
    workspace = tmp_path / "ws"
    config = PipelineConfig(
        source=str(source), workspace=str(workspace), top_k=5,
        retrieval={"max_epochs": 2, "batch_size": 512}, ranking={"max_epochs": 1},
    )
    dates = [LAST_DAY - dt.timedelta(days=2), LAST_DAY - dt.timedelta(days=1), LAST_DAY]
    summaries = backfill(dates[0], dates[-1], config)

    assert [s["run_date"] for s in summaries] == [d.isoformat() for d in dates]
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    runs = MlflowClient(tracking_uri=uri).search_runs(["1"], order_by=["attributes.start_time ASC"])
    assert [r.data.tags["run_date"] for r in runs] == [d.isoformat() for d in dates]
    assert [r.info.run_id for r in runs] == [s["nightly_run_id"] for s in summaries]
    seen = []
    for day in dates:
        end_of_day = int(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc).timestamp())
        snapshot = pl.read_parquet(workspace / "snapshots" / f"run_date={day}" / "interactions.parquet")
        assert snapshot["timestamp"].max() < end_of_day
        assert snapshot.height == interactions.filter(pl.col("timestamp") < end_of_day).height
        assert pl.read_parquet(workspace / "recommendations" / f"run_date={day}" / "*.parquet").height > 0
        seen.append(snapshot.height)
    assert seen[0] < seen[1] < seen[2] < interactions.height


def test_cli_backfill_rejects_an_end_before_its_start(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "backfill", "--start", "2026-11-03", "--end", "2026-11-01",
         "--workspace", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "recflow: error: --end 2026-11-01 is before --start 2026-11-03"
