"""Approximate retrieval (`retrieval.index: ann`) against the exact search.

Two measurements:

- **search**: on a night's workspace (its features and served retrieval model), the
  two-tower's top-100 for every user, seen items excluded, by the exact search and through
  the HNSW graph of the same item embeddings: recall@100 of the approximate search against
  the exact one, each search's seconds in the same process, and the graph's build seconds
  (paid once per trained model). Targets: recall@100 at least 0.98; at 150k items the
  approximate search at least 5x faster than the exact one.
- **lists** (a dataset): splits it as bench/quality.py does, runs the real pipeline
  (`recflow run`) on the visible part twice, with `retrieval.index` exact and ann, and
  scores both nights' written top-10 lists on the hidden part; then the search measurement
  on the ann night's workspace. Target: NDCG@10 with ann within 1% of exact.

    python bench/ann.py lists DATASET [DATASET ...]   (bench/results/ann-<name>.json)
    python bench/ann.py search WORKSPACE --name NAME  (bench/results/ann-search-<name>.json)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from bench import doctables
from bench.quality import RUN_DATE, K, label, load, split, write_visible
from schemas.tables import ModelDir
from tasks.features import load_features, user_histories
from tasks.inference import RetrievalBundle, item_graph, retrieve, rows_of
from tasks.metrics import ranking_metrics

ROOT = Path(__file__).resolve().parents[1]
TOP = 100


def search(workspace: Path) -> dict:
    """Exact against approximate top-TOP for every user of the workspace's latest night."""
    features = load_features(sorted((workspace / "features").glob("run_date=*"))[-1])
    models = max((path for path in (workspace / "models").iterdir() if (path / "settings.json").exists()),
                 key=lambda path: path.stat().st_mtime)
    bundle = RetrievalBundle.load(ModelDir(path=models))
    users = features.users["user_idx"].to_numpy()
    queries = bundle.queries(users.astype(np.int32),
                             user_histories(features.events, features.n_users, bundle.history_length)[users])
    exclude = rows_of(users, features.events)
    started = time.perf_counter()
    graph = item_graph(bundle.item_embeddings)
    build = time.perf_counter() - started
    seconds = {}
    for name, index in (("exact", None), ("ann", graph)):
        started = time.perf_counter()
        top, _ = retrieve(queries, bundle.item_embeddings, exclude, TOP, graph=index)
        seconds[name] = time.perf_counter() - started
        if name == "exact":
            exact = top
    found = np.mean([np.intersect1d(a, b).size / a.size for a, b in zip(exact, top)])
    return {
        "users": int(users.size), "items": int(features.n_items), "dim": int(bundle.item_embeddings.shape[1]),
        f"recall_at_{TOP}": round(float(found), 4), "exact_seconds": round(seconds["exact"], 2),
        "ann_seconds": round(seconds["ann"], 2), "speedup": round(seconds["exact"] / seconds["ann"], 2),
        "build_seconds": round(build, 2),
    }


def lists(dataset: str) -> dict:
    """Both nights' written lists on the hidden part, then the search on the ann night."""
    interactions, items = load(dataset)
    visible, hidden = split(interactions)
    truth = hidden.select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"))
    report = {"dataset": label(dataset)}
    with tempfile.TemporaryDirectory() as scratch:
        data = write_visible(visible, items, Path(scratch))
        for index in ("exact", "ann"):
            workspace, config = Path(scratch) / index, Path(scratch) / f"{index}.json"
            config.write_text(json.dumps({"retrieval": {"index": index}}))
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "flows.cli", "run", "--source", str(data), "--workspace",
                            str(workspace), "--run-date", RUN_DATE, "--top-k", str(K), "--config", str(config)],
                           cwd=ROOT, check=True, capture_output=True)
            seconds = time.perf_counter() - started
            written = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
            written = written.select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"), "rank")
            metrics = ranking_metrics(written, truth, K, visible["item_id"].n_unique())
            report[index] = {"ndcg_at_10": round(metrics["ndcg"], 4), "recall_at_10": round(metrics["recall"], 4),
                             "run_seconds": round(seconds, 1)}
        report["ndcg_ratio"] = round(report["ann"]["ndcg_at_10"] / report["exact"]["ndcg_at_10"], 4)
        report["search"] = search(Path(scratch) / "ann")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    on_lists = sub.add_parser("lists", help="exact and ann nights on datasets, scored on held-out events")
    on_lists.add_argument("datasets", nargs="+", help="dataset directories, 'movielens:<name>' or 'synthetic'")
    on_search = sub.add_parser("search", help="the searches alone on an existing workspace")
    on_search.add_argument("workspace", type=Path)
    on_search.add_argument("--name", required=True, help="names the result file")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    if args.command == "search":
        reports = {args.name: search(args.workspace)}
    else:
        reports = {label(dataset): lists(dataset) for dataset in args.datasets}
    for name, report in reports.items():
        print(json.dumps(report), flush=True)
        prefix = "ann-search" if args.command == "search" else "ann"
        path = args.results / f"{prefix}-{name}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        doctables.after_writing(path)


if __name__ == "__main__":
    main()
