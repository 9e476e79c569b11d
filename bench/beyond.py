"""Beyond accuracy: recall of new (cold) items, and the diversity/accuracy trade-off.

Cold items. A seeded 10% of the items with at least 5 interactions become new items: all
their interactions are removed from what the pipeline sees, while they stay in the items
table (title, genres). The real pipeline (`recflow run`, defaults) runs on the rest. Each
user who interacted with a cold item is then shown the cold items ranked by the retrieval
model (the user's query against the candidate tower, which knows a cold item only by its
content), and recall@10 of the cold items they really chose is compared with a random
order and with category popularity (a cold item scored by the mean popularity of the warm
items in its categories; one list for everyone).

Diversity. The quality protocol (docs/quality.md, bench/quality.py's split); the pipeline runs at
several `lists.diversity` weights in one workspace (the models are trained once and reused) and
its written top-10 lists are scored for accuracy and for intra-list diversity, novelty
and popularity bias, with the pipeline's own metric functions.

    python bench/beyond.py DATASET_DIR [--out bench/results/beyond.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import doctables  # noqa: E402
import quality  # noqa: E402

from schemas.tables import ModelDir  # noqa: E402
from tasks.features import load_features, user_histories  # noqa: E402
from tasks.inference import RetrievalBundle  # noqa: E402
from tasks.metrics import list_metrics, ranking_metrics  # noqa: E402

K = 10
RUN_DATE = quality.RUN_DATE
WEIGHTS = (0.0, 0.3, 0.6)


def pipeline(data: Path, workspace: Path, **config) -> float:
    """Run `recflow run` on `data` with `config` on top of the defaults; return its seconds."""
    settings = workspace.parent / "config.json"
    settings.write_text(json.dumps(config))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--source", str(data), "--workspace", str(workspace),
         "--run-date", RUN_DATE, "--config", str(settings)],
        check=True, cwd=Path(__file__).resolve().parents[1],
    )
    return time.perf_counter() - started


def write_source(directory: Path, interactions: pl.DataFrame, items: pl.DataFrame) -> Path:
    directory.mkdir()
    interactions.write_parquet(directory / "interactions.parquet")
    items.write_parquet(directory / "items.parquet")
    return directory


def cold_start(interactions: pl.DataFrame, items: pl.DataFrame, scratch: Path) -> dict:
    counts = interactions.group_by("item_id").len().filter(pl.col("len") >= 5).sort("item_id")
    rng = np.random.default_rng(0)
    cold = counts["item_id"].to_numpy()[rng.permutation(counts.height)[: counts.height // 10]]
    is_cold = pl.col("item_id").is_in(cold.tolist())
    workspace = scratch / "cold-workspace"
    seconds = pipeline(write_source(scratch / "cold-data", interactions.filter(~is_cold), items), workspace)

    features = load_features(workspace / "features" / f"run_date={RUN_DATE}")
    (models,) = (workspace / "models").iterdir()
    bundle = RetrievalBundle.load(ModelDir(path=models))
    cold_items = features.items.filter(is_cold).select("item_id", "item_idx", "categories_idx")
    truth = (
        interactions.filter(is_cold).select("user_id", "item_id").unique()
        .join(features.users.select("user_id", "user_idx"), on="user_id")  # users with other history
        .join(cold_items.select("item_id", "item_idx"), on="item_id")
    )
    users = np.unique(truth["user_idx"].to_numpy())
    history = user_histories(features.events, features.n_users, bundle.history_length)[users]
    scores = bundle.queries(users.astype(np.int32), history) @ bundle.item_embeddings[cold_items["item_idx"]].T
    warm = features.items.filter(~is_cold).select("categories_idx", "popularity").explode("categories_idx")
    category_mean = warm.group_by("categories_idx").agg(pl.col("popularity").mean())
    by_category = (
        cold_items.explode("categories_idx").join(category_mean, on="categories_idx", how="left")
        .group_by("item_idx", maintain_order=True).agg(pl.col("popularity").fill_null(0).mean())
    )
    category_scores = cold_items.join(by_category, on="item_idx", how="left")["popularity"].fill_null(0).to_numpy()
    orders = {
        "recflow retrieval (content of the cold item)": np.argsort(-scores, axis=1, kind="stable"),
        "category popularity": np.tile(np.argsort(-category_scores, kind="stable"), (users.size, 1)),
        "random": np.argsort(rng.random(scores.shape), axis=1),
    }
    truth_table = truth.select(pl.col("user_idx").alias("user"), pl.col("item_idx").alias("item"))
    cold_idx = cold_items["item_idx"].to_numpy()
    results = {
        name: ranking_metrics(_lists(users, cold_idx[order[:, :K]]), truth_table, K, cold_idx.size)
        for name, order in orders.items()
    }
    written = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    in_lists = written.filter(is_cold)
    return {
        "cold_items": int(cold.size),
        "users_scored": int(users.size),
        "pipeline_seconds": round(seconds, 1),
        "recall_among_cold_items": results,
        "written_lists_with_a_cold_item": in_lists["user_id"].n_unique() / written["user_id"].n_unique(),
        "cold_items_in_written_lists": in_lists["item_id"].n_unique(),
    }


def diversity_tradeoff(interactions: pl.DataFrame, items: pl.DataFrame, scratch: Path) -> dict:
    visible, hidden = quality.split(interactions)
    truth = hidden.select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"))
    n_items = visible["item_id"].n_unique()
    data, workspace = write_source(scratch / "visible", visible, items), scratch / "workspace"
    results = {}
    for weight in WEIGHTS:
        seconds = pipeline(data, workspace, lists={"diversity": weight})
        features = load_features(workspace / "features" / f"run_date={RUN_DATE}")
        written = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet").select(
            pl.col("user_id").alias("user"), pl.col("item_id").alias("item"), "rank"
        )
        indexed = written.join(features.items.select(pl.col("item_id").alias("item"), "item_idx"), on="item").select(
            "user", pl.col("item_idx").alias("item"), "rank"
        )
        results[f"diversity {weight}"] = (
            ranking_metrics(written, truth, K, n_items)
            | list_metrics(indexed, features.item_popularity, features.item_categories, K) | {"seconds": seconds}
        )
    return results


def _lists(users: np.ndarray, top: np.ndarray) -> pl.DataFrame:
    return pl.DataFrame({"user": np.repeat(users, top.shape[1]), "item": top.ravel(),
                         "rank": np.tile(np.arange(1, top.shape[1] + 1), users.size)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a dataset directory with items (titles, categories)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/beyond.json"))
    args = parser.parse_args()
    interactions, items = quality.load(args.dataset)
    with tempfile.TemporaryDirectory() as scratch:
        report = {
            "dataset": args.dataset,
            "cold_start": cold_start(interactions, items, Path(scratch)),
            "diversity": diversity_tradeoff(interactions, items, Path(scratch)),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(doctables.beyond_tables(report))
    doctables.after_writing(args.out)

if __name__ == "__main__":
    main()
