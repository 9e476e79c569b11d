"""Speed on one machine, each figure against a reference measured in the same run.

- training: examples/second of the pipeline's retrieval model (its own input pipeline)
  against the TFRS basic retrieval tutorial's setup (bench/tutorial.py) on the same `fit`
  examples, embedding size and batch; target >= 5x. Also the share of step time the
  input alone takes.
- scoring: achieved GFLOP/s of retrieval top-N for every user (tasks.inference.retrieve:
  blocked scores, seen items excluded, top-N selected) against one plain float32 numpy
  product of the same shapes; target >= 0.6x. Ranking: pairs/second of the ranker.

    python bench/speed.py DATASET_DIR
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from bench import doctables
from bench.scale import _machine
from schemas.config import PipelineConfig, RankingConfig, RetrievalConfig, Run
from tasks.features import load_features
from tasks.featurize import build_features
from tasks.ingest import ingest

ROOT = Path(__file__).resolve().parents[1]


def training(features, cfg: RetrievalConfig, length: int, epochs: int = 3) -> dict:
    """The pipeline's retrieval model on its own input pipeline; the first epoch is not timed."""
    from bench.tutorial import _Timer
    from tasks import towers
    from tasks.retrieval import training_batches, training_examples
    from tasks.tfenv import seed_everything

    seed_everything(42)
    dataset, steps = training_batches(training_examples(features.events.filter(pl.col("split") == "fit"), length),
                                      cfg.batch_size, 42, 10**12)
    model = towers.TwoTower(features, length, cfg)
    model.compile(optimizer=towers.RowSparseAdam(cfg.learning_rate, model.penalties()))
    timer = _Timer()
    model.fit(dataset, epochs=epochs, steps_per_epoch=steps, callbacks=[timer], verbose=0)
    step_seconds = sum(t for epoch in timer.batches[1:] for t in epoch)
    iterator = iter(dataset)
    started = time.perf_counter()
    for _ in range(steps * (epochs - 1)):
        next(iterator)
    input_seconds = time.perf_counter() - started
    return {
        "examples_per_second": steps * cfg.batch_size * (epochs - 1) / sum(timer.epochs[1:]),
        "step_ms": 1000 * step_seconds / (steps * (epochs - 1)),
        "input_time_share": input_seconds / step_seconds,
        "batches_per_epoch": steps,
        "batch_size": cfg.batch_size,
        "embedding_dim": cfg.embedding_dim,
        "history_encoder": cfg.history_encoder,
    }


def tutorial(features, cfg: RetrievalConfig) -> dict:
    from bench.tutorial import tutorial_throughput

    fit = features.events.filter(pl.col("split") == "fit")
    examples = fit.join(features.users.select("user_idx", "user_id"), on="user_idx").join(
        features.items.select("item_idx", "item_id"), on="item_idx"
    )
    return tutorial_throughput(examples.select("user_id", "item_id"), cfg.embedding_dim, cfg.batch_size, epochs=2)


def scoring(users: int, items: int, dim: int, n: int = 100, seen_per_user: int = 50) -> dict:
    """retrieve() on random embeddings against a single numpy product of the same shapes."""
    from tasks.inference import BLOCK_SCORES, retrieve

    rng = np.random.default_rng(0)
    queries = rng.standard_normal((users, dim), dtype=np.float32)
    catalogue = rng.standard_normal((items + 1, dim), dtype=np.float32)
    rows = np.repeat(np.arange(users), seen_per_user)
    seen = rng.integers(1, items + 1, rows.size)
    flop = 2.0 * users * (items + 1) * dim
    started = time.perf_counter()
    product = queries @ catalogue.T
    reference = time.perf_counter() - started
    del product
    block = BLOCK_SCORES // (items + 1)  # a stricter reference: BLAS alone, on retrieve's blocks
    started = time.perf_counter()
    for start in range(0, users, block):
        queries[start : start + block] @ catalogue.T
    blocked = time.perf_counter() - started
    started = time.perf_counter()
    retrieve(queries, catalogue, (rows, seen), n)
    ours = time.perf_counter() - started
    return {
        "shape": f"{users} users x {items} items x {dim}",
        "top_n": n,
        "retrieve_gflops": flop / ours / 1e9,
        "numpy_matmul_gflops": flop / reference / 1e9,
        "ratio": reference / ours,
        "target": 0.6,
        "numpy_blocked_matmul_gflops": flop / blocked / 1e9,
        "ratio_to_blocked": blocked / ours,
        "peak_block_mib": 2 * block * (items + 1) * 4 / 2**20,
    }


def ranking(features, pairs: int = 1_024_000, block: int = 102_400) -> dict:
    """Ranker inference pairs/second, in the blocks scoring uses (1024 users x 100 candidates)."""
    from tasks import towers
    from tasks.candidates import FEATURES
    from tasks.tfenv import tf

    model = towers.Ranker(features, RankingConfig(), popularity_feature=FEATURES.index("log_item_popularity"))
    rng = np.random.default_rng(0)
    numeric = rng.standard_normal((block, len(FEATURES))).astype(np.float32)
    model.adapt(numeric)
    inputs = {
        "user_idx": tf.constant(rng.integers(1, features.n_users + 1, block).astype(np.int32)),
        "item_idx": tf.constant(rng.integers(1, features.n_items + 1, block).astype(np.int32)),
        "numeric": tf.constant(numeric),
    }
    score = tf.function(lambda batch: model(batch))
    score(inputs)
    started = time.perf_counter()
    for _ in range(pairs // block):
        score(inputs).numpy()
    return {"pairs_per_second": pairs / (time.perf_counter() - started), "block_pairs": block}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a dataset directory (MovieLens or generic layout)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speed.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        config = PipelineConfig(source=str(Path(args.dataset).resolve()), workspace=scratch, run_date="2026-11-27")
        run = Run.of(config)
        features = load_features(build_features(run, ingest(run)).path)
        ours = training(features, config.retrieval, config.features.history_length)
        print(json.dumps({"training": ours}), flush=True)
        reference = tutorial(features, config.retrieval)
        print(json.dumps({"tutorial": reference}), flush=True)
        report = {
            "machine": _machine(),
            "dataset": args.dataset,
            "training": {
                "recflow": ours,
                "tfrs_tutorial": reference,
                "ratio": ours["examples_per_second"] / reference["examples_per_second"],
                "target": 5.0,
            },
            "scoring": scoring(16_384, 50_000, config.retrieval.embedding_dim),
            "ranking": ranking(features),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    doctables.after_writing(args.out)


if __name__ == "__main__":
    main()
