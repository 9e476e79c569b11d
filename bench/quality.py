"""Quality benchmark: the pipeline's written lists against held-out future interactions.

Applies the quality protocol (docs/quality.md) to a dataset directory: for each user with at least
5 interactions, the latest 20% (rounded up; ordered by timestamp, ties by item id) are
hidden; hidden items never seen in the visible part are dropped. The real pipeline
(`recflow run --top-k 10`, default settings) runs on the visible part only, in a subprocess;
its written top-10 lists are scored on the hidden part with the same metric functions the
pipeline uses, next to classical baselines computed on the same split: popularity, item-kNN,
EASE, recency-weighted EASE and iALS. The development datasets' tables are written into
docs/quality.md and the README's summary (bench/doctables.py).

    python bench/quality.py DATASET [DATASET ...]   (bench/results/quality-<name>.json, docs tables)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import baselines  # noqa: E402
import doctables  # noqa: E402

from schemas.config import SyntheticConfig  # noqa: E402
from schemas.tables import ModelDir  # noqa: E402
from tasks.ingest import fetch_movielens, generate_synthetic, read_directory  # noqa: E402
from tasks.metrics import ranking_metrics  # noqa: E402

IALS_GRID = [  # (factors, regularization, alpha): a small grid; the best row is reported
    (64, 0.01, 1.0), (64, 0.1, 10.0), (128, 0.1, 5.0), (128, 1.0, 20.0),
]

K = 10
RUN_DATE = "2026-11-27"
# The built-in source, and a repeat-heavy world of it (a third of a walk's steps go back to an
# earlier item) for the repeat rule (`lists.repeats`).
SYNTHETIC = {"synthetic": SyntheticConfig(), "synthetic-repeats": SyntheticConfig(repeat_share=0.3)}


def split(interactions: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(visible, hidden) under the protocol."""
    n = pl.len().over("user_id")
    position = pl.int_range(pl.len()).over("user_id")
    n_hidden = (n * 0.2).ceil().clip(lower_bound=1)
    ordered = interactions.sort("user_id", "timestamp", "item_id").with_columns(
        ((n >= 5) & (position >= n - n_hidden)).alias("hidden")
    )
    visible = ordered.filter(~pl.col("hidden")).drop("hidden")
    hidden = ordered.filter(pl.col("hidden")).drop("hidden")
    hidden = hidden.filter(pl.col("item_id").is_in(visible["item_id"].unique().implode()))
    return visible, hidden


def write_visible(visible: pl.DataFrame, items: pl.DataFrame | None, directory: Path) -> Path:
    """The visible part (and the item table) as a dataset directory, `directory`/visible."""
    data = directory / "visible"
    data.mkdir()
    visible.write_parquet(data / "interactions.parquet")
    if items is not None:
        items.write_parquet(data / "items.parquet")
    return data


def classical(visible: pl.DataFrame, users: list[str]) -> dict[str, tuple[pl.DataFrame, float]]:
    """Each baseline's lists for `users` and its seconds, on the visible part only."""
    matrix = baselines.Matrix.build(visible)
    runs: dict[str, tuple[pl.DataFrame, float]] = {}

    def timed(name, fn, *args, **kwargs):
        started = time.perf_counter()
        runs[name] = (fn(matrix, users, *args, **kwargs), time.perf_counter() - started)

    timed("popularity", baselines.popularity)
    timed("item-kNN (cosine, shrink 10)", baselines.item_knn)
    started = time.perf_counter()
    weights = baselines.ease_weights(matrix)
    fit_seconds = time.perf_counter() - started
    timed("EASE (l2=200)", baselines.ease, weights)
    timed("EASE, recency-weighted history (half-life 5)", baselines.recency_ease, weights)
    for name in ("EASE (l2=200)", "EASE, recency-weighted history (half-life 5)"):
        runs[name] = (runs[name][0], runs[name][1] + fit_seconds)
    for factors, regularization, alpha in IALS_GRID:
        timed(f"iALS (f={factors}, reg={regularization}, alpha={alpha})", baselines.ials, factors, regularization, alpha)
    return runs


def retrieval_only(workspace: Path) -> pl.DataFrame:
    """The run's two-tower top-K lists without the ranker, over everything the run saw."""
    from tasks.evaluate import retrieval_lists
    from tasks.features import load_features

    features = load_features(workspace / "features" / f"run_date={RUN_DATE}")
    users = features.users["user_idx"].to_numpy()
    (models,) = (workspace / "models").iterdir()  # a fresh workspace holds the one run's models
    lists = retrieval_lists(ModelDir(path=models), features, features.events, users, K)
    return (
        lists.join(features.users.select(pl.col("user_idx").alias("user"), "user_id"), on="user")
        .join(features.items.select(pl.col("item_idx").alias("item"), "item_id"), on="item")
        .select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"), "rank")
    )


def load(dataset: str) -> tuple[pl.DataFrame, pl.DataFrame | None]:
    """Interactions and items of a dataset directory, a GroupLens archive ('movielens:<name>',
    downloaded once) or the seeded synthetic source."""
    if dataset in SYNTHETIC:
        return generate_synthetic(SYNTHETIC[dataset], dt.date.fromisoformat(RUN_DATE), seed=7)
    directory = fetch_movielens(dataset.split(":", 1)[1]) if dataset.startswith("movielens:") else Path(dataset)
    interactions, items, _ = read_directory(directory)
    return interactions, items


def label(dataset: str) -> str:
    """The short name of a dataset in result files and the docs: its directory or archive name."""
    return dataset.split(":", 1)[1] if dataset.startswith("movielens:") else Path(dataset).name


def popularity_ratio(lists: pl.DataFrame, visible: pl.DataFrame, truth: pl.DataFrame) -> float:
    """Popularity bias of top-K lists: the mean visible-part interaction count of the listed
    items over that of the items users actually picked next (1 = as popular as the truth,
    above 1 = leaning to the head of the catalogue)."""
    counts = visible.group_by(pl.col("item_id").alias("item")).agg(pl.len().alias("n"))
    listed = lists.filter(pl.col("rank") <= K).join(counts, on="item", how="left")["n"].fill_null(0).mean()
    picked = truth.join(counts, on="item", how="left")["n"].fill_null(0).mean()
    return float(listed / picked) if picked else float("nan")


def bench(dataset: str, config: Path | None = None) -> dict:
    """One dataset's report: recflow's written top-K lists (run with the settings of
    `config`, a PipelineConfig file, when given) and each baseline's, scored alike."""
    interactions, items = load(dataset)
    visible, hidden = split(interactions)
    truth = hidden.select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"))
    n_items = visible["item_id"].n_unique()

    def score(lists: pl.DataFrame) -> dict[str, float]:
        return ranking_metrics(lists, truth, K, n_items) | {"popularity_ratio": popularity_ratio(lists, visible, truth)}

    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        data, workspace = write_visible(visible, items, Path(scratch)), Path(scratch) / "workspace"
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--source", str(data), "--workspace", str(workspace),
             "--run-date", RUN_DATE, "--top-k", str(K), *(["--config", str(config.resolve())] if config else [])],
            check=True, cwd=Path(__file__).resolve().parents[1],
        )
        runtime = time.perf_counter() - started
        written = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
        results["recflow (as written)"] = score(
            written.select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"), "rank")
        ) | {"seconds": runtime}
        results["recflow retrieval only (same run's two-tower model)"] = score(retrieval_only(workspace))
    for name, (lists, seconds) in classical(visible, hidden["user_id"].unique().to_list()).items():
        results[name] = score(lists) | {"seconds": seconds}
    ials_rows = [name for name in results if name.startswith("iALS")]
    best = max(ials_rows, key=lambda name: results[name]["ndcg"])
    results = {name: values for name, values in results.items() if name not in ials_rows or name == best}
    return {
        "dataset": dataset,
        "protocol": "per user with >=5 events, latest 20% (ceil) hidden; hidden items unseen in visible dropped; "
        "full ranking, seen excluded; lists written by `recflow run --top-k 10`; Recall@10 = hits/min(10,#hidden); "
        "NDCG@10 binary gains; coverage = share of the visible catalogue in any top-10 list; popularity ratio = "
        "mean visible count of listed items / that of the hidden items",
        "config": json.loads(config.read_text()) if config else {},
        "repeat_targets": hidden.join(visible, on=["user_id", "item_id"], how="semi").height,
        "hidden_events": hidden.height,
        "users_scored": hidden["user_id"].n_unique(),
        "results": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("datasets", nargs="+", help="dataset directories, 'movielens:<name>' or 'synthetic'")
    parser.add_argument("--results", type=Path, default=Path("bench/results"),
                        help="where to write quality-<dataset>.json")
    parser.add_argument("--config", type=Path, help="a PipelineConfig file (JSON) for recflow's run, e.g. "
                        "lists.repeats; its name is added to the result file's")
    args = parser.parse_args()
    for dataset in args.datasets:
        report = bench(dataset, args.config)
        name = label(dataset) + (f"-{args.config.stem}" if args.config else "")
        args.results.mkdir(parents=True, exist_ok=True)
        (args.results / f"quality-{name}.json").write_text(json.dumps(report, indent=2))
        print(f"\n{name}\n{doctables.quality_table(report)}", flush=True)
        doctables.after_writing(args.results / f"quality-{name}.json")


if __name__ == "__main__":
    main()
