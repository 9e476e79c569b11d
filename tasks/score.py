"""Batch scoring and publishing: every user's top-K list, written whole or not at all.

Eighth and ninth stages of the nightly DAG. `prepare` makes the staging directory of
tonight's partition with what every shard shares (the co-occurrence similarity of
tonight's histories); `score_shard` writes one range of users' part of the output table
there, block by block of `tasks.lists.recommend_blocks` (shards may run on Dask workers);
`publish` renames the directory into recommendations/run_date=.../ with its manifest. When
the partition already holds the lists of the same features, models, champion decision and
list settings, all three reuse it.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import polars as pl
import scipy.sparse as sp

from schemas.config import Run
from schemas.tables import RECOMMENDATIONS, ChampionDecision, FeatureSet, PublishedTable, ScoredShard, ScoringJob
from tasks.features import load_features
from tasks.lists import USERS_PER_BLOCK, history_similarity, recommend_blocks
from tasks.stage import stage
from tasks.workspace import publish_dir, reuse, stage_key, stamp, temp_dir, write_json, write_parquet_blocks

log = logging.getLogger(__name__)

SHARED = "_similarity.npz"  # scoring's shared input, removed before publishing


def prepare(run: Run, features: FeatureSet, decision: ChampionDecision) -> ScoringJob:
    """A staging directory for tonight's partition, holding what every shard shares (the
    co-occurrence similarity of tonight's histories, in the scoring models' indices)."""
    cfg = run.config
    key = stage_key("recommendations", features.key, decision.models.name, decision.model_version,
                    decision.mlflow_run_id, cfg.top_k, cfg.lists)
    job = ScoringJob(key=key, path=run.partition("recommendations"), features=features, decision=decision)
    if reuse(job.path, key, PublishedTable) is not None:
        return job.model_copy(update={"reused": True})
    loaded = load_features(features.path)
    staged = temp_dir(run.workspace, "recommendations")
    sp.save_npz(staged / SHARED, history_similarity(decision.models, loaded, loaded.events), compressed=False)
    return job.model_copy(update={"path": staged})


def shard_users(n_users: int, shard: int, shards: int) -> np.ndarray:
    """The user_idx range of `shard` (of `shards`): whole USERS_PER_BLOCK blocks, so a
    sharded run scores exactly the blocks a single process does, bit for bit."""
    blocks = np.array_split(np.arange(-(-n_users // USERS_PER_BLOCK)), shards)[shard]
    if blocks.size == 0:
        return np.zeros(0, dtype=np.int64)
    return np.arange(blocks[0] * USERS_PER_BLOCK, min((blocks[-1] + 1) * USERS_PER_BLOCK, n_users)) + 1


def score_shard(run: Run, job: ScoringJob, shard: int) -> ScoredShard:
    """Write the top-K lists of one user range (shard `shard` of `shards`), as the output
    table, to the job's staging directory as part-<shard>.parquet."""
    if job.reused:
        return ScoredShard(key=job.key, shard=shard, rows=0, reused=True)
    cfg, decision = run.config, job.decision
    features = load_features(job.features.path)
    users = shard_users(features.n_users, shard, cfg.shards)
    if users.size == 0:  # more shards than blocks of users
        return ScoredShard(key=job.key, shard=shard, rows=0)
    similarity = sp.load_npz(job.path / SHARED)
    user_ids = features.users.sort("user_idx")["user_id"]  # user_idx 1, 2, ...
    written = {"rows": 0, "filled": 0}

    def tables():
        """Each block's lists as the output table. Blocks come in user_idx order, which is
        user_id order (the vocabulary is sorted), so the part is sorted by user and rank."""
        for recs in recommend_blocks(decision.models, features, users, features.events, cfg.top_k, similarity,
                                     cfg.lists):
            written["rows"] += recs.height
            written["filled"] += recs.filter("filled")["user_idx"].n_unique()  # blocks share no user
            yield (
                recs.with_columns(
                    user_ids.gather(recs["user_idx"] - 1).alias("user_id"),
                    pl.lit(run.run_date).alias("run_date"),
                    pl.lit(decision.model_version).alias("model_version"),
                    pl.lit(decision.mlflow_run_id).alias("mlflow_run_id"),
                )
                .sort("user_id", "rank")
                .select(RECOMMENDATIONS.names())
                .cast(dict(RECOMMENDATIONS))
            )

    write_parquet_blocks(tables(), RECOMMENDATIONS, job.path / f"part-{shard:05d}.parquet")
    log.info("scored shard %d of %d in process %d: %d users, %d rows, %d list(s) filled from the fallback",
             shard + 1, cfg.shards, os.getpid(), users.size, written["rows"], written["filled"])
    return ScoredShard(key=job.key, shard=shard, rows=written["rows"], users_filled=written["filled"])


def publish(run: Run, job: ScoringJob, shards: list[ScoredShard], run_id: str) -> PublishedTable:
    """Move the scored partition into place atomically, with a manifest beside the parts
    (the model version that scored and its training run, `mlflow_run_id` as in the table;
    tonight's MLflow run as `nightly_run_id`) and its stage record."""
    target = run.partition("recommendations")
    if job.reused:
        return reuse(target, job.key, PublishedTable)
    log.info("scored %d shard(s): %d rows (flow process %d)", len(shards), sum(s.rows for s in shards), os.getpid())
    (job.path / SHARED).unlink(missing_ok=True)
    users = pl.scan_parquet(job.path / "*.parquet").select(pl.col("user_id").n_unique()).collect().item()
    published = PublishedTable(key=job.key, path=target, rows=sum(s.rows for s in shards), users=users,
                               users_filled=sum(s.users_filled for s in shards))
    manifest = {"run_date": run.run_date.isoformat(), "model_version": job.decision.model_version,
                "mlflow_run_id": job.decision.mlflow_run_id, "nightly_run_id": run_id}
    write_json(manifest | published.model_dump(mode="json", include={"path", "rows", "users", "users_filled"}),
               job.path / "_manifest.json")
    stamp(job.path, published)
    publish_dir(job.path, target)
    log.info("published %s (%d rows, %d users, %d filled from the fallback)", published.path, published.rows,
             published.users, published.users_filled)
    return published


prepare_scoring_task = stage("score", prepare)
score_shard_task = stage("score_shard", score_shard, task_run_name="score_shard-{shard}")
publish_task = stage("publish", publish)
