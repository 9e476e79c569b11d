"""Scale: the real `recflow run` on the synthetic source at 1M, 3M, 10M and 30M interactions.

Each size runs in a fresh workspace as its own process; the report gives wall time, the
peak resident memory of the pipeline process, each stage's seconds, and the time per
million interactions against the 1M run (a ratio above 1 would mean faster-than-linear
growth). After each run, bench/ann.py's search measurement on its workspace (exact against
approximate top-100 for every user), outside the run's time and memory. Targets on 2 cores
/ 24 GB: at 10M (200k users, 50k items) at most 15 minutes and 8 GB peak RSS; at 30M (600k
users, 150k items) at most 30 minutes and 10 GB; time per million interactions at most the
1M run's.

`--training` measures what bounds training at scale instead: the retrieval model's time
per step (a fixed batch) on the 1M and on the 10M features, with the pipeline's row-sparse
Adam and, as the reference in the same run, Keras' Adam, with and without a user-id
embedding. Target: a step at 10M within 1.3x of a step at 1M.

    python bench/scale.py                 # 1M, 3M and 10M (30M only when asked: about an hour)
    python bench/scale.py --sizes 1M,10M  # some sizes
    python bench/scale.py --training      # step times (about 6 minutes)
    python bench/scale.py --rules         # what the business rules cost scoring at 1M (about 6 minutes)

`--rules` measures what the business rules (docs/lists.md) add to scoring: a real run at 1M
(the synthetic source's rules: discontinued and upcoming items, exclusions; one training
epoch, since training is not what is measured), then the score stage's work (the shared
similarity, then every user's list) on its features and models three ways, taking turns in
one process: without any rule (every item servable, no exclusion), with the night's rules,
and with the rules and `lists.max_per_category: 3`. Target: rules at most 1.05x.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from bench import doctables

ROOT = Path(__file__).resolve().parents[1]
RUN_DATE = "2026-11-27"
# ~60 events per user on average before de-duplication gives ~1.0, 3.0 and 10.7M interactions.
SIZES = {
    "1M": {"n_users": 20_000, "n_items": 5_000, "events_per_user": 60},
    "3M": {"n_users": 60_000, "n_items": 15_000, "events_per_user": 60},
    "10M": {"n_users": 200_000, "n_items": 50_000, "events_per_user": 60},
    "30M": {"n_users": 600_000, "n_items": 150_000, "events_per_user": 60},
}


def run_size(name: str, workspace: Path, log: Path) -> dict:
    """One `recflow run` in a child process; peak RSS is the child's (children are waited one by one)."""
    config = workspace.parent / f"{name}.json"
    config.write_text(json.dumps({"source": "synthetic", "synthetic": SIZES[name]}))
    started = time.perf_counter()
    with log.open("w") as stderr:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--run-date", RUN_DATE,
             "--workspace", str(workspace)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name}: recflow run failed; its log is {log}")
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    return {
        "size": name,
        "synthetic": SIZES[name],
        "interactions": _interactions(workspace),
        "wall_s": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 2),
        "stage_s": {k.removeprefix("time_").removesuffix("_s"): v for k, v in summary.items() if k.startswith("time_")},
        "ndcg_at_10": summary.get("ndcg_at_10"),
        "popularity_ndcg_at_10": summary.get("popularity_ndcg_at_10"),
    }


def training_steps(sizes: list[str], steps: int = 40, rounds: int = 5) -> dict:
    """Milliseconds per retrieval training step (default batch) on each size's features, per
    optimiser and with the user-id embedding off and on: the median step of `rounds` rounds of
    `steps` steps, the four models taking turns (this machine's speed drifts; turns share it)."""
    from bench.tutorial import _Timer
    from schemas.config import PipelineConfig, Run
    from tasks import towers
    from tasks.features import load_features
    from tasks.featurize import build_features
    from tasks.ingest import ingest
    from tasks.retrieval import training_batches, training_examples
    from tasks.tfenv import keras, seed_everything

    def keras_adam(model, learning_rate):  # Keras' own Adam, with the id tables' penalty as Keras regularisers
        for table, l2 in model.penalties():
            table.embeddings_regularizer = keras.regularizers.l2(l2)
        return keras.optimizers.Adam(learning_rate)

    def row_sparse_adam(model, learning_rate):
        return towers.RowSparseAdam(learning_rate, model.penalties())

    optimisers = {"row-sparse Adam": row_sparse_adam, "Keras Adam": keras_adam}
    rows = []
    for name in sizes:
        with tempfile.TemporaryDirectory() as scratch:
            config = PipelineConfig(source="synthetic", synthetic=SIZES[name], workspace=scratch, run_date=RUN_DATE)
            run = Run.of(config)
            features = load_features(build_features(run, ingest(run)).path)
            examples = training_examples(features.events.filter(pl.col("split") == "fit"),
                                         config.features.history_length)
            models = {}
            for user_embedding in (False, True):
                cfg = config.retrieval.model_copy(update={"user_embedding": user_embedding})
                for optimiser, make in optimisers.items():
                    seed_everything(config.seed)
                    dataset, _ = training_batches(examples, cfg.batch_size, config.seed, 10**12)
                    model = towers.TwoTower(features, config.features.history_length, cfg)
                    model.compile(optimizer=make(model, cfg.learning_rate))
                    model.fit(dataset, epochs=1, steps_per_epoch=10, verbose=0)
                    models[optimiser, user_embedding] = model, dataset
            timings = {key: [] for key in models}
            for _ in range(rounds):
                for key, (model, dataset) in models.items():
                    timer = _Timer()
                    model.fit(dataset, epochs=1, steps_per_epoch=steps, callbacks=[timer], verbose=0)
                    timings[key] += timer.batches[0][1:]  # the first waits for a new iterator's first batch
            for (optimiser, user_embedding), values in timings.items():
                rows.append({"size": name, "users": features.n_users, "items": features.n_items,
                             "user_embedding": user_embedding, "optimiser": optimiser,
                             "step_ms": round(1000 * float(np.median(values)), 1),
                             "step_ms_quartiles": [round(1000 * float(q), 1) for q in np.quantile(values, [.25, .75])]})
                print(json.dumps(rows[-1]), flush=True)
    first, last = sizes[0], sizes[-1]
    step = {(r["size"], r["optimiser"], r["user_embedding"]): r["step_ms"] for r in rows}
    growth = {f"{optimiser}, user embedding {'on' if on else 'off'}":
              round(step[last, optimiser, on] / step[first, optimiser, on], 2)
              for optimiser in optimisers for on in (False, True)}
    return {"machine": _machine(), "batch_size": config.retrieval.batch_size, "steps": steps, "rounds": rounds,
            "runs": rows,
            f"step_{last}_vs_{first}": growth, "target": 1.3}


def rules_cost(size: str = "1M", rounds: int = 3) -> dict:
    """Seconds of the score stage's work without rules, with the night's rules, and with a
    category cap too, on one run's features and models (see the module docstring)."""
    import dataclasses

    import polars as pl

    from schemas.config import ListConfig
    from schemas.tables import ModelDir
    from tasks.features import EXCLUSIONS, load_features
    from tasks.lists import history_similarity, recommend

    with tempfile.TemporaryDirectory() as scratch:
        workspace, config = Path(scratch) / "ws", Path(scratch) / "rules.json"
        config.write_text(json.dumps({"synthetic": SIZES[size], "top_k": 20, "retrieval": {"max_epochs": 1},
                                      "ranking": {"max_epochs": 1}}))
        subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--run-date", RUN_DATE,
                        "--workspace", str(workspace)], cwd=ROOT, check=True, capture_output=True)
        features = load_features(next((workspace / "features").glob("run_date=*")))
        manifest = json.loads(next((workspace / "recommendations").glob("run_date=*/_manifest.json")).read_text())
        run_key = next(path.parent.name for path in (workspace / "models").glob("*/settings.json"))
        models = ModelDir(path=workspace / "models" / run_key)
        no_rules = dataclasses.replace(features, items=features.items.with_columns(servable=pl.lit(True)),
                                       exclusions=pl.DataFrame(schema=EXCLUSIONS))
        variants = {"no rules": (no_rules, ListConfig()), "the night's rules": (features, ListConfig()),
                    "rules and max_per_category 3": (features, ListConfig(max_per_category=3))}
        users = np.arange(1, features.n_users + 1)
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(rounds):
            for name, (loaded, lists) in variants.items():
                started = time.perf_counter()
                recommend(models, loaded, users, loaded.events, 20, history_similarity(models, loaded, loaded.events),
                          lists)
                seconds[name].append(time.perf_counter() - started)
        median = {name: float(np.median(values)) for name, values in seconds.items()}
        return {"machine": _machine(), "size": size, "users": features.n_users, "items": features.n_items,
                "unservable_items": int((~features.servable[1:]).sum()), "exclusions": features.exclusions.height,
                "users_filled": manifest.get("users_filled"), "rounds": rounds,
                "score_s": {name: round(value, 2) for name, value in median.items()},
                "ratio_to_no_rules": {name: round(value / median["no rules"], 3) for name, value in median.items()},
                "target": 1.05}


def _interactions(workspace: Path) -> int:
    import polars as pl

    snapshot = next((workspace / "snapshots").glob("run_date=*")) / "interactions.parquet"
    return pl.scan_parquet(snapshot).select(pl.len()).collect().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,3M,10M", help="comma-separated, of " + ", ".join(SIZES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--training", action="store_true", help="time training steps at 1M and 10M instead")
    parser.add_argument("--rules", action="store_true", help="time scoring with and without business rules at 1M")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one size in this process
    args = parser.parse_args()
    if args.training:
        report = training_steps(["1M", "10M"])
        out = args.out.with_name("scale-training.json")
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        doctables.after_writing(out)
        return
    if args.rules:
        report = rules_cost()
        out = args.out.with_name("scale-rules.json")
        out.write_text(json.dumps(report, indent=2))
        print(json.dumps(report, indent=2))
        doctables.after_writing(out)
        return
    if args.one:
        from bench.ann import search

        with tempfile.TemporaryDirectory() as scratch:
            row = run_size(args.one, Path(scratch) / "ws", args.out.with_name(f"scale-{args.one}.log"))
            row["ann_search"] = search(Path(scratch) / "ws")  # after the run: not in its time or memory
            print(json.dumps(row))
        return
    rows = []
    for name in args.sizes.split(","):
        # A process per size, so each peak RSS is that size's own.
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", name, "--out", str(args.out)],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for row in rows:
        row["s_per_million_vs_first"] = round(
            (row["wall_s"] / row["interactions"]) / (base["wall_s"] / base["interactions"]), 3
        )
    report = {"machine": _machine(), "runs": rows,
              "targets": {"10M_wall_s": 900, "10M_peak_rss_gb": 8, "30M_wall_s": 1800, "30M_peak_rss_gb": 10,
                          "growth": "s_per_million_vs_first <= 1"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    doctables.after_writing(args.out)


def _machine() -> str:
    import os
    import platform

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.0f} GiB, {platform.processor() or platform.machine()}, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
