"""The fallback lists: recent popularity, overall and per category."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from schemas.tables import Snapshot
from tasks.catalogue import fallback_lists

RUN_DATE = dt.date(2026, 11, 20)
END = int(dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc).timestamp())  # the end of the run date
DAY = 86_400


def snapshot(tmp_path, events: list[tuple[str, int]]) -> Snapshot:
    pl.DataFrame({"user_id": [f"u{i}" for i in range(len(events))], "item_id": [item for item, _ in events],
                  "timestamp": [END - days * DAY for _, days in events]}).write_parquet(tmp_path / "interactions.parquet")
    pl.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["A", "B", "C", "D"],
                  "categories": [["x"], ["x", "y"], ["y"], []]}).write_parquet(tmp_path / "items.parquet")
    return Snapshot(path=tmp_path, source="test", n_interactions=len(events), n_users=len(events), n_items=4,
                    has_items=True, data_hash="", origin={})


def test_fallback_ranks_by_recent_popularity_overall_and_within_each_category(tmp_path):
    # a: two events 30 days ago (0.5 each, half-life 30 days); b: one event today; c: one event 60 days ago.
    lists = fallback_lists(snapshot(tmp_path, [("a", 30), ("a", 30), ("b", 0), ("c", 60)]), RUN_DATE, k=2,
                           half_life_days=30)
    overall = lists.filter(pl.col("category").is_null())
    assert overall["item_id"].to_list() == ["a", "b"]  # ties broken by item id; c (0.25) is past k
    assert overall["score"].to_list() == pytest.approx([1.0, 1.0])
    assert overall["rank"].to_list() == [1, 2]
    by_category = {c: group["item_id"].to_list() for (c,), group in lists.drop_nulls("category").group_by("category")}
    assert by_category == {"x": ["a", "b"], "y": ["b", "c"]}  # d (no events, no category) is nowhere
