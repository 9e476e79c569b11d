"""The tables beside the recommendations: fallback lists and similar items.

Last stage of the nightly DAG, after the recommendations are published. `fallback/` is
what to serve a user the run does not know (a new visitor, a user who arrived after the
run): the items most popular lately, overall and within each category, for when the app
knows nothing or only which category the user is browsing. `similar_items/` is "more like
this": each item's nearest items by the scoring model's candidate tower, whose content
features place an item that nobody has interacted with yet next to items like it. Both hold
only the items tonight's business rules let a list show (docs/lists.md, "Business rules").
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

from schemas.config import Run
from schemas.tables import FALLBACK, SIMILAR_ITEMS, Catalogue, ChampionDecision, FeatureSet, ModelDir, Snapshot
from tasks.features import Features, load_features
from tasks.inference import RetrievalBundle, item_graph, model_item_map, retrieve
from tasks.stage import stage
from tasks.workspace import publish_dir, temp_dir, write_parquet

log = logging.getLogger(__name__)


def publish_catalogue(run: Run, snapshot: Snapshot, features: FeatureSet, decision: ChampionDecision) -> Catalogue:
    """Write tonight's fallback/ and similar_items/ partitions, each whole or not at all."""
    cfg = run.config
    loaded = load_features(features.path)
    similar = similar_items(decision.models, loaded, cfg.similar_items)
    tables = {
        "fallback": (fallback_lists(loaded, snapshot, cfg.top_k), FALLBACK),
        "similar_items": (similar.with_columns(pl.lit(decision.model_version).alias("model_version"),
                                               pl.lit(decision.mlflow_run_id).alias("mlflow_run_id")), SIMILAR_ITEMS),
    }
    for name, (table, schema) in tables.items():
        staged = temp_dir(run.workspace, name)
        dated = table.with_columns(pl.lit(run.run_date).alias("run_date"))
        write_parquet(dated.select(schema.names()).cast(dict(schema)), staged / "part-00000.parquet")
        publish_dir(staged, run.partition(name))
    published = Catalogue(fallback_rows=tables["fallback"][0].height, similar_items_rows=similar.height)
    log.info("published fallback (%d rows) and similar_items (%d rows)", published.fallback_rows,
             published.similar_items_rows)
    return published


def fallback_lists(features: Features, snapshot: Snapshot, k: int) -> pl.DataFrame:
    """The `k` servable items with the most recent popularity, overall (category null) and
    per category, scored by `recent_popularity` (tasks/featurize.py: log2 of the events, each
    counting 1 when the lists go out and half as much every `popularity_half_life_days`
    before)."""
    scores = (features.items.filter(pl.col("servable") & pl.col("recent_popularity").is_not_null())
              .select("item_id", pl.col("recent_popularity").alias("score")))
    lists = [scores.with_columns(pl.lit(None, pl.String).alias("category"))]
    if snapshot.has_items:
        categories = pl.read_parquet(snapshot.items, columns=["item_id", "categories"]).explode("categories")
        lists.append(scores.join(categories.drop_nulls("categories").rename({"categories": "category"}), on="item_id"))
    rank = pl.col("score").rank("ordinal", descending=True).over("category")
    return (
        pl.concat(lists, how="diagonal_relaxed")
        .sort("category", "score", "item_id", descending=[False, True, False], nulls_last=False)
        .with_columns(rank.cast(pl.Int32).alias("rank"))
        .filter(pl.col("rank") <= k)
        .sort("category", "rank", nulls_last=False)
        .select("category", "rank", "item_id", "score")
    )


def similar_items(models: ModelDir, features: Features, k: int) -> pl.DataFrame:
    """Each item of tonight's catalogue that the models know, with its `k` nearest such
    items that are servable tonight, by cosine similarity of the candidate tower's
    embeddings (an item that may not be shown still has its neighbours: its page may stay
    up). Where the models are searched approximately, so is this: through the models' graph
    when they were trained on tonight's catalogue (their embeddings are unit vectors
    already), else through a graph of these items."""
    model_idx = model_item_map(models, features)
    known = np.flatnonzero(model_idx[1:] > 0)
    bundle = RetrievalBundle.load(models)
    embeddings = bundle.item_embeddings[model_idx[1:][known]]
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    unit = np.vstack([np.zeros((1, unit.shape[1]), unit.dtype), unit])
    rows = np.arange(known.size)
    servable = np.concatenate([[False], features.servable[1:][known]])
    graph = bundle.graph
    if graph is not None and not np.array_equal(model_idx[1:][known], np.arange(1, bundle.item_embeddings.shape[0])):
        graph = item_graph(unit)  # the models' graph holds other items than tonight's (an earlier night's champion)
    top, scores = retrieve(unit[1:], unit, (rows, rows + 1), k, allowed=None if servable[1:].all() else servable,
                           graph=graph)
    ids = features.items["item_id"].to_numpy()[known]
    width = top.shape[1]
    table = pl.DataFrame(
        {
            "item_id": np.repeat(ids, width),
            "rank": np.tile(np.arange(1, width + 1, dtype=np.int32), known.size),
            "similar_item_id": np.concatenate([[None], ids]).astype(object)[top.ravel()],
            "score": scores.ravel(),
        },
        schema_overrides={"item_id": pl.String, "similar_item_id": pl.String},
    )
    return table.filter(pl.col("score").is_finite())


catalogue_task = stage("catalogue", publish_catalogue)
