"""Features: vocabularies, the time split, user sequences and item content, in polars.

Third stage of the nightly DAG, after validation. It maps string ids onto contiguous
indices (0 is padding / unknown), splits each user's events by time into `fit` (training),
`valid` (early stopping, ranker training) and `test` (the pipeline's own evaluation), and
turns titles and categories into token indices for the candidate tower. Later stages load
the result with `load_features` and build their arrays with the helpers at the bottom;
nothing loops over rows in Python.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from prefect import task

from schemas.config import FeatureConfig
from schemas.tables import EVENTS, SPLITS, FeatureSet, Snapshot
from tasks.workspace import partition, publish_dir, stamp, temp_dir, write_parquet

log = logging.getLogger(__name__)

MAX_CATEGORIES = 8


def build_features(snapshot: Snapshot, workspace: Path, run_date: dt.date, cfg: FeatureConfig, key: str) -> FeatureSet:
    """Write features/run_date=.../ (stamped with its cache `key`) from a validated snapshot."""
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
    events = _split(interactions, users, items, cfg)
    staged = temp_dir(workspace, "features")
    write_parquet(users, staged / "users.parquet")
    write_parquet(items, staged / "items.parquet")
    write_parquet(events, staged / "events.parquet")
    split_sizes = {name: int(events.filter(pl.col("split") == name).height) for name in SPLITS}
    feature_set = FeatureSet(
        path=partition(workspace, "features", run_date),
        n_users=users.height,
        n_items=items.height,
        n_categories=int(items["categories_idx"].explode().max() or 0),
        n_title_tokens=int(items["title_idx"].explode().max() or 0),
        split_sizes=split_sizes,
    )
    stamp(staged, key, feature_set)
    publish_dir(staged, feature_set.path)
    log.info("features: %d users, %d items, split %s", feature_set.n_users, feature_set.n_items, split_sizes)
    return feature_set


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


# --- loading and arrays for the model stages -----------------------------------------


@dataclass(frozen=True)
class Features:
    """A feature set in memory: vocabularies, time-ordered events and item content arrays."""

    users: pl.DataFrame
    items: pl.DataFrame
    events: pl.DataFrame  # sorted by user_idx, timestamp
    item_categories: np.ndarray  # (n_items + 1, MAX_CATEGORIES), 0 = padding
    item_title: np.ndarray  # (n_items + 1, max_title_tokens)
    item_popularity: np.ndarray  # (n_items + 1,), events in the fit split

    @property
    def n_users(self) -> int:
        return self.users.height

    @property
    def n_items(self) -> int:
        return self.items.height

    def sampled(self, user_idx: np.ndarray) -> np.ndarray:
        """The users of `user_idx` in the features' user sample (FeatureConfig.sample_users)."""
        return user_idx[self.users["in_sample"].to_numpy()[user_idx - 1]]


def load_features(path: Path) -> Features:
    items = pl.read_parquet(path / "items.parquet")
    events = pl.read_parquet(path / "events.parquet")
    fit = events.filter(pl.col("split") == "fit")
    popularity = np.bincount(fit["item_idx"].to_numpy(), minlength=items.height + 1).astype(np.float64)
    return Features(
        users=pl.read_parquet(path / "users.parquet"),
        items=items,
        events=events,
        item_categories=padded(items["categories_idx"], MAX_CATEGORIES),
        item_title=padded(items["title_idx"], max(1, int(items["title_idx"].list.len().max() or 1))),
        item_popularity=popularity,
    )


def padded(lists: pl.Series, width: int) -> np.ndarray:
    matrix = np.zeros((lists.len() + 1, width), dtype=np.int32)  # row 0 = padding item
    lengths = lists.list.len().to_numpy().astype(np.int64)
    flat = lists.explode().drop_nulls().to_numpy().astype(np.int32)
    rows = np.repeat(np.arange(1, lists.len() + 1), lengths)
    columns = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    keep = columns < width
    matrix[rows[keep], columns[keep]] = flat[keep]
    return matrix


def event_histories(events: pl.DataFrame, length: int) -> np.ndarray:
    """For each event (sorted by user, time), the user's `length` previous items, newest first."""
    users = events["user_idx"].to_numpy()
    items = events["item_idx"].to_numpy()
    first = _first_of_user(users)
    index = np.arange(users.size)
    history = np.zeros((users.size, length), dtype=np.int32)
    for k in range(1, length + 1):
        source = index - k
        valid = source >= first
        history[valid, k - 1] = items[source[valid]]
    return history


def user_histories(events: pl.DataFrame, n_users: int, length: int) -> np.ndarray:
    """Each user's `length` latest items among `events` (sorted by user, time), newest first.

    Row u belongs to user index u; users without events get an all-padding row.
    """
    users = events["user_idx"].to_numpy()
    items = events["item_idx"].to_numpy()
    history = np.zeros((n_users + 1, length), dtype=np.int32)
    if users.size == 0:
        return history
    last = np.flatnonzero(np.append(users[1:] != users[:-1], True))
    first = _first_of_user(users)[last]
    for k in range(length):
        source = last - k
        valid = source >= first
        history[users[last[valid]], k] = items[source[valid]]
    return history


def save_vocabulary(features: Features, out: Path) -> Path:
    """The vocabularies a model was trained with, saved beside it."""
    out.mkdir(parents=True, exist_ok=True)
    features.users.write_parquet(out / "users.parquet")
    features.items.write_parquet(out / "items.parquet")
    np.save(out / "item_popularity.npy", features.item_popularity)
    return out


def _first_of_user(users: np.ndarray) -> np.ndarray:
    starts = np.flatnonzero(np.insert(users[1:] != users[:-1], 0, True))
    return np.repeat(starts, np.diff(np.append(starts, users.size)))


@task(name="features")
def features_task(snapshot: Snapshot, workspace: Path, run_date: dt.date, cfg: FeatureConfig, key: str) -> FeatureSet:
    return build_features(snapshot, workspace, run_date, cfg, key)
