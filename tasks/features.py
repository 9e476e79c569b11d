"""The feature set in memory, and the arrays every model stage builds from it.

`load_features` reads what the features stage (tasks/featurize.py) wrote: the two
vocabularies (index 0 is padding / unknown), the time-ordered events with their split,
and item content as padded index arrays. The helpers below turn events into the
sequences the query tower reads; nothing loops over rows in Python.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from schemas.tables import ModelDir

MAX_CATEGORIES = 8  # categories kept per item
# exclusions.parquet of a feature set: the (user, item) pairs in force tonight (schemas/rules.py);
# user_idx is null for a user the night does not know (the registered model may be asked for them).
EXCLUSIONS = pl.Schema({"user_id": pl.String, "user_idx": pl.Int32, "item_idx": pl.Int32})
RULES = "rules.json"  # of a feature set: the moment its night's business rules were evaluated at


@dataclass(frozen=True)
class Features:
    """A feature set in memory: vocabularies, time-ordered events and item content arrays."""

    users: pl.DataFrame
    items: pl.DataFrame
    events: pl.DataFrame  # sorted by user_idx, timestamp
    item_categories: np.ndarray  # (n_items + 1, MAX_CATEGORIES), 0 = padding
    item_title: np.ndarray  # (n_items + 1, max_title_tokens)
    item_popularity: np.ndarray  # (n_items + 1,), events in the fit split
    exclusions: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=EXCLUSIONS))  # never to list tonight
    moment: int | None = None  # when the night's lists go out (unix seconds): what repeats count from

    @property
    def n_users(self) -> int:
        return self.users.height

    @property
    def servable(self) -> np.ndarray:
        """(n_items + 1,) bool: the items tonight's lists may show (row 0, padding, never)."""
        flags = self.items["servable"].to_numpy() if "servable" in self.items.columns else np.ones(self.n_items, bool)
        return np.concatenate([[False], flags])

    def fallback_order(self) -> np.ndarray:
        """Tonight's servable items (item_idx), most popular lately first: what fills a list
        the rules left short, as the fallback table lists them."""
        items = self.items.filter(pl.col("servable")) if "servable" in self.items.columns else self.items
        if "recent_popularity" in items.columns:
            items = items.sort("recent_popularity", "item_id", descending=[True, False], nulls_last=True)
        return items["item_idx"].to_numpy()

    @property
    def n_items(self) -> int:
        return self.items.height

    def sampled(self, user_idx: np.ndarray) -> np.ndarray:
        """The users of `user_idx` in the features' user sample (FeatureConfig.sample_users)."""
        return user_idx[self.users["in_sample"].to_numpy()[user_idx - 1]]


def load_features(path: Path) -> Features:
    """A feature set written by the features stage (one an earlier recflow wrote, without
    business rules, loads with every item servable and no exclusion)."""
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
        exclusions=pl.read_parquet(path / "exclusions.parquet") if (path / "exclusions.parquet").exists()
        else pl.DataFrame(schema=EXCLUSIONS),
        moment=json.loads((path / RULES).read_text())["moment"] if (path / RULES).exists() else None,
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


def event_histories(events: pl.DataFrame, length: int, rows: np.ndarray | None = None) -> np.ndarray:
    """For each event (sorted by user, time), or each of the events at `rows`, the user's
    `length` previous items, newest first."""
    users = events["user_idx"].to_numpy()
    items = events["item_idx"].to_numpy()
    index = np.arange(users.size) if rows is None else rows
    first = _first_of_user(users)[index]
    history = np.zeros((index.size, length), dtype=np.int32)
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


def save_vocabulary(features: Features, models: ModelDir) -> None:
    """The vocabularies a model was trained with, saved beside it."""
    models.vocabulary.mkdir(parents=True, exist_ok=True)
    features.users.write_parquet(models.users)
    features.items.write_parquet(models.items)
    np.save(models.item_popularity, features.item_popularity)


def _first_of_user(users: np.ndarray) -> np.ndarray:
    starts = np.flatnonzero(np.insert(users[1:] != users[:-1], 0, True))
    return np.repeat(starts, np.diff(np.append(starts, users.size)))
