"""Runs killed with SIGKILL at the worst moments, two runs on one workspace, reruns.

Real `recflow run` subprocesses on small synthetic data. After each kill: no partial
partition is visible, the champion is whole, the next run completes normally.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import ROOT, SMALL

pytestmark = pytest.mark.slow

RUN_DATE = "2026-11-20"


def command(workspace: Path, config: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--workspace", str(workspace), "--run-date", RUN_DATE,
            "--config", str(config)]


def write_config(path: Path, **changes) -> Path:
    base = {"top_k": 10, "synthetic": SMALL.model_dump(), "retrieval": {"max_epochs": 3, "batch_size": 512}}
    path.write_text(json.dumps(base | changes))
    return path


def published_state(workspace: Path) -> dict:
    """What readers see: each visible partition's files, and the champion version."""
    from mlflow.tracking import MlflowClient

    state = {}
    for partition in sorted((workspace / "recommendations").glob("run_date=*")):
        stage = json.loads((partition / "_stage.json").read_text())["record"]
        table = pl.read_parquet(partition / "*.parquet")
        assert table.height == stage["rows"]  # whole, never half-written
        state[partition.name] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(partition.iterdir())}
    assert not list((workspace / "recommendations").glob("*.parquet"))
    assert [p.name for p in (workspace / "recommendations").iterdir() if not p.name.startswith("run_date=")] == []
    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    champion = MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias("recflow-retrieval", "champion")
    assert (workspace / "models" / champion.tags["model_key"] / "ranking" / "saved_model.pb").exists()
    state["champion"] = champion.version
    return state


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("crash") / "ws"
    config = write_config(workspace.parent / "base.json")
    done = subprocess.run(command(workspace, config), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return workspace


def start_and_kill(workspace: Path, config: Path, marker: str, delay: float) -> None:
    """Start a run, SIGKILL it `delay` seconds after `marker` shows in its log; the
    processes it started (its temporary Prefect server) must not outlive it."""
    env = {name: value for name, value in os.environ.items() if name != "PREFECT_API_URL"}  # its own server
    process = subprocess.Popen(command(workspace, config), cwd=ROOT, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.monotonic() + 600
    for line in process.stderr:
        if marker in line:
            break
        assert time.monotonic() < deadline and process.poll() is None, f"{marker!r} never logged"
    time.sleep(delay)
    children = [int(pid) for task in Path(f"/proc/{process.pid}/task").iterdir()
                for pid in (task / "children").read_text().split()]
    assert children  # the temporary server at least
    process.kill()
    process.wait()
    deadline = time.monotonic() + 30
    while (left := [pid for pid in children if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not left, f"processes {left} outlived the killed run"


def _running(pid: int) -> bool:
    """Whether `pid` is a live process (an exited one not yet reaped is a zombie, "Z")."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "stage, delay, changes",
    [
        ("train_retrieval", 3.0, {"retrieval": {"max_epochs": 3, "batch_size": 512, "learning_rate": 0.001}}),
        ("score", 0.5, {"top_k": 7}),
        ("publish", 0.0, {"top_k": 8}),
    ],
)
def test_a_run_killed_during_a_stage_leaves_no_partial_output_and_the_next_run_completes(
    workspace, stage, delay, changes
):
    before = published_state(workspace)
    config = write_config(workspace.parent / f"{stage}.json", **changes)
    start_and_kill(workspace, config, f"stage {stage}: started", delay)
    after = published_state(workspace)  # every visible partition whole, the champion's models complete
    assert after["champion"] == before["champion"]
    if stage != "publish":  # killed before the rename: yesterday's lists still there, unchanged
        assert after == before
    done = subprocess.run(command(workspace, config), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    assert table.group_by("user_id").len()["len"].unique().to_list() == [changes.get("top_k", 10)]
    assert not list((workspace / ".tmp").glob("*"))  # the completed run cleaned what the killed one left


def test_a_second_run_on_a_busy_workspace_fails_fast_with_who_holds_it(workspace):
    # Training that never ends on its own (tiny epochs, no early stop): the first run holds the lock until killed.
    config = write_config(workspace.parent / "busy.json", retrieval={
        "max_epochs": 1000, "patience": 1000, "max_examples_per_epoch": 512, "batch_size": 512, "l2": 1e-6})
    first = subprocess.Popen(command(workspace, config), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    try:
        for line in first.stderr:
            if "stage train_retrieval: started" in line:
                break
        started = time.monotonic()
        second = subprocess.run(command(workspace, config), cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith(f"recflow: error: workspace {workspace} is in use by another run (pid {first.pid}")
        assert time.monotonic() - started < 120  # no waiting for the first run
    finally:
        first.kill()
        first.wait()


def test_recomputing_a_date_from_scratch_gives_byte_identical_output(workspace):
    config = write_config(workspace.parent / "base.json")
    subprocess.run(command(workspace, config), cwd=ROOT, capture_output=True, timeout=600, check=True)
    partition = workspace / "recommendations" / f"run_date={RUN_DATE}"
    before = {p.name: p.read_bytes() for p in partition.glob("*.parquet")}
    champion = published_state(workspace)["champion"]
    for cached in ("features", "snapshots", "models"):  # forget every cached stage; the champion is downloaded back
        shutil.rmtree(workspace / cached)
    (partition / "_stage.json").unlink()
    done = subprocess.run(command(workspace, config), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name: p.read_bytes() for p in partition.glob("*.parquet")} == before
    assert published_state(workspace)["champion"] == champion
