"""Features: vocabularies, the time split and item content, in polars.

Third stage of the nightly DAG, after validation. It maps string ids onto contiguous
indices (0 is padding / unknown), splits each user's events by time into `fit` (training),
`valid` (early stopping, ranker training) and `test` (the pipeline's own evaluation), and
turns titles and categories into token indices for the candidate tower. It also evaluates
tonight's business rules (schemas/rules.py) once: which items are servable when the lists go
out, and which (user, item) exclusions hold then, and each item's recent popularity, the
order of the fallback lists. Later stages load the result with
`tasks.features.load_features`.
"""

from __future__ import annotations

import logging

import numpy as np
import polars as pl

from schemas.config import FeatureConfig, Run
from schemas.rules import in_force, servable_catalogue, serving_moment
from schemas.tables import EVENTS, SPLITS, FeatureSet, Snapshot
from tasks.features import EXCLUSIONS, MAX_CATEGORIES, RULES
from tasks.stage import stage
from tasks.workspace import publish_dir, reuse, stage_key, stamp, temp_dir, write_json, write_parquet

log = logging.getLogger(__name__)


def build_features(run: Run, snapshot: Snapshot) -> FeatureSet:
    """Write features/run_date=.../ from a validated snapshot (or reuse what an earlier run
    wrote there from the same snapshot and `features` config)."""
    cfg = run.config.features
    key = stage_key("features", snapshot.key, cfg, run.config.popularity_half_life_days)
    if (found := reuse(run.partition("features"), key, FeatureSet)) is not None:
        return found
    interactions = (
        pl.read_parquet(snapshot.interactions, columns=["user_id", "item_id", "timestamp"])
        .sort("timestamp", "item_id")
        .unique(["user_id", "item_id"], keep="last", maintain_order=True)
    )
    items_table = pl.read_parquet(snapshot.items) if snapshot.has_items else None
    users = (
        interactions.group_by("user_id")
        .agg(pl.len().alias("n_events"))
        .sort("user_id")
        .with_row_index("user_idx", offset=1)
        .with_columns(pl.col("user_idx").cast(pl.Int32))
        .select("user_id", "user_idx", "n_events")
    )
    users = users.with_columns(pl.Series("in_sample", _sample(users.height, cfg.sample_users)))
    items = _item_vocabulary(interactions, items_table, cfg)
    moment = serving_moment(run.run_date)
    exclusions = pl.read_parquet(snapshot.exclusions).filter(in_force(moment)) if snapshot.exclusions.exists() else None
    catalogue = items.select("item_id").join(items_table, on="item_id", how="left") if items_table is not None else items
    items = items.join(servable_catalogue(catalogue, exclusions, moment), on="item_id", how="left").join(
        _recent_popularity(snapshot, moment, run.config.popularity_half_life_days), on="item_id", how="left"
    ).sort("item_idx")
    events = _split(interactions, users, items, cfg)
    staged = temp_dir(run.workspace, "features")
    write_parquet(users, staged / "users.parquet")
    write_parquet(items, staged / "items.parquet")
    write_parquet(events, staged / "events.parquet")
    write_json({"moment": moment}, staged / RULES)
    if exclusions is not None:
        pairs = exclusions.drop_nulls("user_id").join(users.select("user_id", "user_idx"), on="user_id", how="left")
        pairs = pairs.join(items.select("item_id", "item_idx"), on="item_id")
        write_parquet(pairs.select(EXCLUSIONS.names()).unique().sort(EXCLUSIONS.names()).cast(dict(EXCLUSIONS)),
                      staged / "exclusions.parquet")
    log.info("features: %d of %d items servable on %s, %d exclusion(s) in force", items["servable"].sum(),
             items.height, run.run_date, 0 if exclusions is None else exclusions.height)
    split_sizes = {name: int(events.filter(pl.col("split") == name).height) for name in SPLITS}
    feature_set = FeatureSet(
        key=key,
        path=run.partition("features"),
        n_users=users.height,
        n_items=items.height,
        n_categories=int(items["categories_idx"].explode().max() or 0),
        n_title_tokens=int(items["title_idx"].explode().max() or 0),
        split_sizes=split_sizes,
    )
    stamp(staged, feature_set)
    publish_dir(staged, feature_set.path)
    log.info("features: %d users, %d items, split %s", feature_set.n_users, feature_set.n_items, split_sizes)
    return feature_set


def _recent_popularity(snapshot: Snapshot, moment: int, half_life_days: float) -> pl.DataFrame:
    """(item_id, recent_popularity): log2 of the item's events, each counting 1 at `moment`
    and half as much every `half_life_days` before it. Summed in log space, so it stays
    ordered however old the data (the counts themselves would underflow to 0)."""
    halvings = -(pl.lit(moment) - pl.col("timestamp")) / (86_400 * half_life_days)
    return (
        pl.read_parquet(snapshot.interactions, columns=["item_id", "timestamp"])
        .with_columns(halvings.alias("halvings"))
        .group_by("item_id")
        .agg((pl.col("halvings").max() + (2 ** (pl.col("halvings") - pl.col("halvings").max())).sum().log(2))
             .alias("recent_popularity"))
    )


def _sample(n: int, size: int) -> np.ndarray:
    """A fixed, seeded choice of `size` of `n` rows (all when fewer): the users whose
    lists validation, ranker training and held-out metrics compute, so their cost stops
    growing with the user base."""
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(0).permutation(n)[:size]] = True
    return chosen


def _item_vocabulary(interactions: pl.DataFrame, items_table: pl.DataFrame | None, cfg: FeatureConfig) -> pl.DataFrame:
    popularity = interactions.group_by("item_id").agg(pl.len().alias("popularity"))
    catalogue = popularity.select("item_id")
    if items_table is not None:
        catalogue = pl.concat([catalogue, items_table.select("item_id")]).unique()
        catalogue = catalogue.join(items_table.select("item_id", "title", "categories"), on="item_id", how="left")
    else:
        catalogue = catalogue.with_columns(pl.lit(None, pl.String).alias("title"), pl.lit(None, pl.List(pl.String)).alias("categories"))
    items = (
        catalogue.join(popularity, on="item_id", how="left")
        .with_columns(pl.col("popularity").fill_null(0).cast(pl.Int64))
        .sort("item_id")
        .with_row_index("item_idx", offset=1)
        .with_columns(pl.col("item_idx").cast(pl.Int32))
    )
    categories = _token_indices(items.select("item_idx", token=pl.col("categories")), None, 1, MAX_CATEGORIES)
    words = items.select(
        "item_idx",
        token=pl.col("title").fill_null("").str.to_lowercase().str.extract_all(r"[a-z][a-z0-9']+"),
    )
    titles = _token_indices(words, cfg.title_vocab_size, 2, cfg.max_title_tokens)
    return (
        items.join(categories.rename({"token_idx": "categories_idx"}), on="item_idx", how="left")
        .join(titles.rename({"token_idx": "title_idx"}), on="item_idx", how="left")
        .with_columns(pl.col("categories_idx", "title_idx").fill_null(pl.lit([], pl.List(pl.Int32))))
        .select("item_id", "item_idx", "title", "popularity", "categories_idx", "title_idx")
        .sort("item_idx")
    )


def _token_indices(tokens: pl.DataFrame, vocab_size: int | None, min_count: int, max_per_item: int) -> pl.DataFrame:
    """Index list-of-string tokens by document frequency (most frequent = 1)."""
    exploded = tokens.explode("token").drop_nulls("token").unique(["item_idx", "token"])
    vocabulary = (
        exploded.group_by("token")
        .agg(pl.len().alias("count"))
        .filter(pl.col("count") >= min_count)
        .sort(["count", "token"], descending=[True, False])
        .head(vocab_size if vocab_size is not None else 1_000_000)
        .with_row_index("token_idx", offset=1)
        .select("token", pl.col("token_idx").cast(pl.Int32))
    )
    return (
        exploded.join(vocabulary, on="token")
        .sort("item_idx", "token_idx")
        .group_by("item_idx", maintain_order=True)
        .agg(pl.col("token_idx").head(max_per_item))
    )


def _split(interactions: pl.DataFrame, users: pl.DataFrame, items: pl.DataFrame, cfg: FeatureConfig) -> pl.DataFrame:
    """Each user's latest events become `test`, the ones before `valid`, the rest `fit`."""
    n = pl.len().over("user_idx")
    position = pl.int_range(pl.len()).over("user_idx")
    eligible = n >= cfg.min_user_events
    n_test = pl.when(eligible).then((n * cfg.holdout_fraction).ceil().clip(lower_bound=1)).otherwise(0)
    n_valid = pl.when(eligible).then(((n - n_test) * cfg.valid_fraction).ceil().clip(lower_bound=1)).otherwise(0)
    return (
        interactions.join(users.select("user_id", "user_idx"), on="user_id")
        .join(items.select("item_id", "item_idx"), on="item_id")
        .sort("user_idx", "timestamp", "item_id")
        .with_columns(
            pl.when(position >= n - n_test)
            .then(pl.lit("test"))
            .when(position >= n - n_test - n_valid)
            .then(pl.lit("valid"))
            .otherwise(pl.lit("fit"))
            .cast(EVENTS["split"])
            .alias("split")
        )
        .select(EVENTS.names())
        .cast(dict(EVENTS))
    )


features_task = stage("features", build_features)
