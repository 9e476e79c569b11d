"""What the tests share: the environment, the small synthetic datasets, a run's config, and
one temporary Prefect server per session.

Tests run in any order (pytest-randomly shuffles them; `-p no:randomly` turns that off
for a debugging session): each test creates what it asserts on, and module fixtures that
several tests read are never changed by them.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use the workspace's own sqlite store

from schemas.config import PipelineConfig, Run, SyntheticConfig  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# Real datasets for the heavier checks (not part of the repository): RECFLOW_DATASETS, by
# default this team's checkout layout. Tests that need one skip when it is missing.
DATASETS = Path(os.environ.get("RECFLOW_DATASETS", ROOT.parent / "shared" / "datasets"))
ML_LATEST_SMALL = DATASETS / "ml-latest-small"

RUN_DATE = dt.date(2026, 11, 20)
# The synthetic data of the end-to-end runs: small enough that a full run trains in seconds.
SMALL = SyntheticConfig(n_users=250, n_items=400, n_clusters=6, events_per_user=40, n_categories=12)
# A config file's contents for a real `recflow run` process on SMALL that trains as little as it can.
FAST_RUN = {"synthetic": SMALL.model_dump(), "top_k": 5, "retrieval": {"max_epochs": 1}, "ranking": {"max_epochs": 1}}


def small_config(workspace: Path, **changes) -> PipelineConfig:
    """The config of an end-to-end test run on SMALL: top-10 lists, short training."""
    values = {"workspace": str(workspace), "run_date": RUN_DATE, "top_k": 10, "synthetic": SMALL,
              "retrieval": {"max_epochs": 8, "batch_size": 512}}
    return PipelineConfig(**(values | changes))


def make_run(workspace: Path, run_date: dt.date = RUN_DATE, **config) -> Run:
    """A run as the stages see it, for calling a stage function directly."""
    return Run.of(PipelineConfig(workspace=str(workspace), run_date=run_date, **config))


def cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`recflow ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=timeout)


def source_tree(directory: Path) -> Path:
    """A copy of the shipped packages in `directory`, without git history (as in a Docker image)."""
    from tasks.workspace import PACKAGES

    for package in PACKAGES:
        shutil.copytree(ROOT / package, directory / package, ignore=shutil.ignore_patterns("__pycache__"))
    return directory


def git(tree: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=tree,
                   capture_output=True, check=True)


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for every test that runs a flow in-process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
