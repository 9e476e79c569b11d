"""Scale-out on existing engines: scoring shards on Dask workers, training under tf.distribute.

Real `recflow run` processes: a local Dask cluster through prefect-dask's DaskTaskRunner,
and a MirroredStrategy over two logical CPU devices.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from schemas.tables import ChampionDecision, FeatureSet, ScoringJob
from tasks.lists import USERS_PER_BLOCK
from tasks.score import prepare, score_shard, shard_users
from tests.conftest import ROOT, make_run

RUN_DATE = "2026-11-20"
# Three scoring blocks of users (of 2,348, 2,194 are active on RUN_DATE), so two shards really split the work.
DATA = {"n_users": 2 * USERS_PER_BLOCK + 300, "n_items": 400, "n_clusters": 6, "events_per_user": 12}
FAST = {"retrieval": {"max_epochs": 1, "batch_size": 512}, "ranking": {"max_epochs": 1}, "top_k": 5}


def recflow_run(tmp_path, name: str, config: dict, *flags: str, env: dict | None = None) -> tuple[dict, str]:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"source": "synthetic", "synthetic": DATA} | FAST | config))
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--config", str(path), "--run-date", RUN_DATE,
         "--workspace", str(tmp_path / name), *flags],
        capture_output=True, text=True, cwd=ROOT, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout[result.stdout.index("{"):]), result.stderr


def test_shards_cover_every_user_once_in_whole_blocks():
    for n_users in (1, USERS_PER_BLOCK, 3 * USERS_PER_BLOCK + 5):
        for shards in (1, 2, 5):
            parts = [shard_users(n_users, shard, shards) for shard in range(shards)]
            assert np.array_equal(np.concatenate(parts), np.arange(1, n_users + 1))
            assert all(part.size == 0 or (part[0] - 1) % USERS_PER_BLOCK == 0 for part in parts)


@pytest.mark.slow
def test_dask_sharded_scoring_writes_the_table_a_single_process_writes(tmp_path):
    summary, log = recflow_run(tmp_path, "dask", {"shards": 2}, "--task-runner", "dask")
    assert "Creating a new Dask cluster" in log
    flow_process = re.search(r"scored 2 shard\(s\): \d+ rows \(flow process (\d+)\)", log).group(1)
    shard_processes = set(re.findall(r"scored shard \d of 2 in process (\d+)", log))
    assert len(shard_processes) == 2 and flow_process not in shard_processes  # two Dask worker processes
    partition = tmp_path / "dask" / "recommendations" / f"run_date={RUN_DATE}"
    assert sorted(p.name for p in partition.glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]
    sharded = pl.read_parquet(partition / "*.parquet")
    workspace = tmp_path / "dask"
    assert sharded["user_id"].n_unique() == _users(workspace) > 2 * USERS_PER_BLOCK

    # The same models and features scored in this one process, as one shard.
    features = json.loads((workspace / "features" / f"run_date={RUN_DATE}" / "_stage.json").read_text())["record"]
    manifest = json.loads((partition / "_manifest.json").read_text())
    models = next(p for p in (workspace / "models").iterdir() if (p / "retrieval").exists())
    decision = ChampionDecision(
        promoted=True, reason="test", model_version=manifest["model_version"], mlflow_run_id=manifest["mlflow_run_id"],
        models_path=models, metrics={},
    )
    run = make_run(workspace / "single", dt.date.fromisoformat(RUN_DATE), top_k=FAST["top_k"], shards=1)
    job = prepare(run, FeatureSet.model_validate(features), decision)
    assert isinstance(job, ScoringJob) and not job.reused
    score_shard(run, job, 0)
    single = pl.read_parquet(job.path / "part-00000.parquet")
    assert single.equals(sharded)


@pytest.mark.slow
def test_training_under_a_mirrored_strategy_over_two_cpu_devices(tmp_path):
    summary, log = recflow_run(tmp_path, "mirrored", {"retrieval": FAST["retrieval"] | {"strategy": "mirrored",
                                                                                        "devices": 2}})
    assert "MirroredStrategy with 2 replica(s)" in log
    assert summary["rows"] == _users(tmp_path / "mirrored") * FAST["top_k"]
    assert summary["ndcg_at_10"] > summary["popularity_ndcg_at_10"]


def _users(workspace) -> int:
    """How many users the run's snapshot holds (the synthetic source's active users that day)."""
    snapshot = workspace / "snapshots" / f"run_date={RUN_DATE}" / "interactions.parquet"
    return pl.read_parquet(snapshot)["user_id"].n_unique()


def test_a_remote_dask_cluster_needs_a_prefect_api_its_workers_can_reach(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--dask-address", "tcp://127.0.0.1:1", "--workspace", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=env,
    )
    assert result.returncode == 2  # a flag error
    assert result.stderr.strip().startswith("recflow: error: --dask-address: remote Dask workers report to the Prefect")
