"""The two-tower model alone, under the quality protocol, for retrieval settings to compare.

Splits a dataset as bench/quality.py does, builds the pipeline's features from the visible
part once per setting, trains only the retrieval model with the default config overlaid by
each setting, and scores its top-10 lists (seen items excluded, tonight's business rules)
against the hidden part: NDCG@10, Recall@10, coverage@10, the epochs kept and the
validation recall per epoch. About a minute per setting on ml-latest-small, so candidate
changes to the retrieval model can be screened before the whole-pipeline bench
(bench/quality.py) judges them next to the classical baselines.

    python bench/retrieval.py DATASET '{}' '{"retrieval": {"temperature": 0.2}}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import polars as pl

from bench.quality import RUN_DATE, K, load, split, write_visible
from schemas.config import PipelineConfig, Run
from schemas.tables import ModelDir
from tasks.evaluate import retrieval_lists
from tasks.features import load_features
from tasks.featurize import build_features
from tasks.ingest import ingest
from tasks.metrics import ranking_metrics
from tasks.retrieval import train_retrieval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a dataset directory, 'movielens:<name>' or 'synthetic'")
    parser.add_argument("settings", nargs="*", default=["{}"], help="PipelineConfig fields as JSON, one per try")
    args = parser.parse_args()
    interactions, items = load(args.dataset)
    visible, hidden = split(interactions)
    truth = hidden.select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"))
    with tempfile.TemporaryDirectory() as scratch:
        data = write_visible(visible, items, Path(scratch))
        for number, setting in enumerate(json.loads(s) for s in args.settings):
            run = Run.of(PipelineConfig(source=str(data), workspace=str(Path(scratch) / f"try-{number}"),
                                        run_date=RUN_DATE, **setting))
            started = time.perf_counter()
            feature_set = build_features(run, ingest(run))
            trained = train_retrieval(run, feature_set)
            seconds = time.perf_counter() - started
            features = load_features(feature_set.path)
            users = features.users["user_idx"].to_numpy()
            lists = (retrieval_lists(ModelDir(path=trained.path.parent), features, features.events, users, K)
                     .join(features.users.select(pl.col("user_idx").alias("user"), "user_id"), on="user")
                     .join(features.items.select(pl.col("item_idx").alias("item"), "item_id"), on="item")
                     .select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"), "rank"))
            metrics = ranking_metrics(lists, truth, K, visible["item_id"].n_unique())
            print(json.dumps({
                "dataset": args.dataset, "setting": setting, "ndcg_at_10": round(metrics["ndcg"], 4),
                "recall_at_10": round(metrics["recall"], 4), "coverage_at_10": round(metrics["coverage"], 4),
                "epochs_kept": trained.epochs, "seconds": round(seconds, 1),
                "valid_recall_per_epoch": [round(v, 4) for v in next(iter(
                    v for k, v in trained.history.items() if k.startswith("valid")))],
            }), flush=True)


if __name__ == "__main__":
    main()
