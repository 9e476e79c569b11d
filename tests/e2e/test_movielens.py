"""The pipeline on the real MovieLens data (ml-latest-small under RECFLOW_DATASETS), through the CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import ML_LATEST_SMALL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not ML_LATEST_SMALL.is_dir(), reason=f"{ML_LATEST_SMALL} not present"),
]


def test_recflow_run_on_ml_latest_small_lists_every_user(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--source", str(ML_LATEST_SMALL), "--workspace", str(tmp_path),
         "--run-date", "2026-11-27"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2], timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pl.read_parquet(tmp_path / "recommendations" / "run_date=2026-11-27" / "*.parquet")
    assert table["user_id"].n_unique() == 610
    assert table.group_by("user_id").len()["len"].unique().to_list() == [20]
    assert table["item_id"].str.contains(r"^\d+$").all()  # MovieLens ids, as strings
