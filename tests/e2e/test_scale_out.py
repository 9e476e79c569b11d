"""Scale-out on existing engines: scoring shards on Dask workers, training under tf.distribute.

Real `recflow run` processes: a local Dask cluster through prefect-dask's DaskTaskRunner,
a MirroredStrategy over two logical CPU devices, and two training workers that Ray Train
starts on a local Ray cluster.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys

import numpy as np
import polars as pl
import pytest

from schemas.tables import ChampionDecision, FeatureSet, ModelSet, ScoringJob
from tasks.lists import USERS_PER_BLOCK
from tasks.retrieval import train_retrieval
from tasks.score import prepare, score_shard, shard_users
from tests.conftest import ROOT, make_run

RUN_DATE = "2026-11-20"
# Three scoring blocks of users (of 2,348, 2,194 are active on RUN_DATE), so two shards really split the work.
DATA = {"n_users": 2 * USERS_PER_BLOCK + 300, "n_items": 400, "n_clusters": 6, "events_per_user": 12}
FAST = {"retrieval": {"max_epochs": 1, "batch_size": 512}, "ranking": {"max_epochs": 1}, "top_k": 5}


def recflow_run(tmp_path, name: str, config: dict, *flags: str, env: dict | None = None) -> tuple[dict, str]:
    result = subprocess.run(_command(tmp_path, name, config, *flags), capture_output=True, text=True, cwd=ROOT,
                            timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout[result.stdout.index("{"):]), result.stderr


def _command(tmp_path, name: str, config: dict, *flags: str) -> list[str]:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({"source": "synthetic", "synthetic": DATA} | FAST | config))
    return [sys.executable, "-m", "flows.cli", "run", "--config", str(path), "--run-date", RUN_DATE,
            "--workspace", str(tmp_path / name), *flags]


def test_shards_cover_every_user_once_in_whole_blocks():
    for n_users in (1, USERS_PER_BLOCK, 3 * USERS_PER_BLOCK + 5):
        for shards in (1, 2, 5):
            parts = [shard_users(n_users, shard, shards) for shard in range(shards)]
            assert np.array_equal(np.concatenate(parts), np.arange(1, n_users + 1))
            assert all(part.size == 0 or (part[0] - 1) % USERS_PER_BLOCK == 0 for part in parts)


@pytest.mark.slow
def test_dask_sharded_scoring_writes_the_table_a_single_process_writes(tmp_path):
    # Through the HNSW graph saved with the models (retrieval.index: ann): every shard reads the one graph.
    summary, log = recflow_run(tmp_path, "dask", {"shards": 2, "retrieval": FAST["retrieval"] | {"index": "ann"}},
                               "--task-runner", "dask")
    assert summary["ndcg_at_10"] > summary["popularity_ndcg_at_10"]
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
    assert (models / "retrieval" / "items.hnsw").exists() and (models / "retrieval-fit" / "items.hnsw").exists()
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


WORKERS = {"strategy": "multi_worker", "workers": 2, "max_epochs": 3}


@pytest.mark.slow
def test_two_ray_train_workers_train_as_one_process_does_and_the_chief_alone_writes_the_model(tmp_path):
    summary, log = recflow_run(tmp_path, "workers", {"retrieval": FAST["retrieval"] | WORKERS})
    assert "Started training worker group of size 2" in log
    assert "worker 0: retrieval: CollectiveAllReduceStrategy with 2 replica(s)" in log
    assert "worker 0: epoch 1:" in log and "worker 1: epoch" not in log  # the chief reports progress
    assert summary["ndcg_at_10"] > summary["popularity_ndcg_at_10"]
    workspace = tmp_path / "workers"
    (models,) = [path for path in (workspace / "models").iterdir() if path.is_dir()]  # one model, the chief's
    assert (models / "retrieval" / "saved_model.pb").exists() and (models / "retrieval-fit" / "saved_model.pb").exists()
    assert not list((workspace / ".tmp").rglob("saved_model.pb"))  # the other worker's exports are gone
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{workspace / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("recflow").experiment_id])
    assert len(runs) == 1  # the workers never talk to MLflow
    trained = ModelSet.model_validate(json.loads((models / "_stage.json").read_text())["record"]).retrieval

    # The same features and config, trained in this one process.
    features = json.loads((workspace / "features" / f"run_date={RUN_DATE}" / "_stage.json").read_text())["record"]
    run = make_run(tmp_path / "one", dt.date.fromisoformat(RUN_DATE),
                   retrieval=FAST["retrieval"] | {"max_epochs": WORKERS["max_epochs"]})
    alone = train_retrieval(run, FeatureSet.model_validate(features))
    recall = "valid_recall_at_50"
    assert trained.metrics[recall] == pytest.approx(alone.metrics[recall], rel=0.05), (trained.metrics, alone.metrics)


@pytest.mark.slow
def test_a_training_worker_killed_mid_training_fails_the_run_in_one_line_and_publishes_nothing(tmp_path):
    config = {"retrieval": FAST["retrieval"] | WORKERS | {"max_epochs": 30, "patience": 30}}
    run = subprocess.Popen(_command(tmp_path, "killed", config), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, cwd=ROOT)
    workers, seen = {}, []
    for line in run.stderr:
        seen.append(line)
        if found := re.search(r"pid=(\d+)\) world_rank=(\d+)", line):
            workers[int(found.group(2))] = int(found.group(1))
        if "worker 0: epoch 1:" in line:
            os.kill(workers[1], signal.SIGKILL)
            break
    else:
        run.kill()
        pytest.fail("training never reached its first epoch:\n" + "".join(seen[-40:]))
    _, rest = run.communicate(timeout=300)
    errors = [line for line in rest.splitlines() if line.startswith("recflow: error:")]
    assert run.returncode == 1
    assert errors == ["recflow: error: retrieval: multi-worker training failed: worker 1 died (ActorDiedError: "
                      "killed, out of memory or crashed); nothing was published"]
    workspace = tmp_path / "killed"
    assert not (workspace / "recommendations").exists()
    assert not [path for path in (workspace / "models").glob("*") if path.is_dir()]


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
