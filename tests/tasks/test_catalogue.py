"""The fallback lists: recent popularity of the servable items, overall and per category."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from schemas.tables import Snapshot
from tasks.catalogue import fallback_lists
from tasks.features import load_features
from tasks.featurize import build_features
from tests.conftest import make_run

RUN_DATE = dt.date(2026, 11, 20)
END = int(dt.datetime(2026, 11, 21, tzinfo=dt.timezone.utc).timestamp())  # the end of the run date
DAY = 86_400


def fallback(tmp_path, events: list[tuple[str, int]], k: int = 2, **item_columns) -> pl.DataFrame:
    """The fallback lists of a snapshot holding `events` (item, days before the end of the
    run date) and items a-d, through the features stage as a run computes them."""
    data = tmp_path / "snapshot"
    data.mkdir()
    pl.DataFrame({"user_id": [f"u{i}" for i in range(len(events))], "item_id": [item for item, _ in events],
                  "timestamp": [END - days * DAY for _, days in events]}).write_parquet(data / "interactions.parquet")
    pl.DataFrame({"item_id": ["a", "b", "c", "d"], "title": ["A", "B", "C", "D"],
                  "categories": [["x"], ["x", "y"], ["y"], []], **item_columns}).write_parquet(data / "items.parquet")
    snapshot = Snapshot(path=data, source="test", n_interactions=len(events), n_users=len(events), n_items=4,
                        has_items=True, data_hash="", origin={})
    run = make_run(tmp_path / "workspace", RUN_DATE, popularity_half_life_days=30)
    return fallback_lists(load_features(build_features(run, snapshot).path), snapshot, k)


def test_fallback_ranks_by_recent_popularity_overall_and_within_each_category(tmp_path):
    # a: two events 30 days ago (0.5 each, half-life 30 days); b: one event today; c: one event 60 days ago.
    lists = fallback(tmp_path, [("a", 30), ("a", 30), ("b", 0), ("c", 60)])
    overall = lists.filter(pl.col("category").is_null())
    assert overall["item_id"].to_list() == ["a", "b"]  # ties broken by item id; c (0.25) is past k
    assert overall["score"].to_list() == pytest.approx([0.0, 0.0])  # log2 of 1.0 each
    assert overall["rank"].to_list() == [1, 2]
    by_category = {c: group["item_id"].to_list() for (c,), group in lists.drop_nulls("category").group_by("category")}
    assert by_category == {"x": ["a", "b"], "y": ["b", "c"]}  # d (no events, no category) is nowhere


def test_fallback_scores_stay_ordered_however_old_the_events(tmp_path):
    # 40 years at a 30-day half-life: each event weighs 2^-487, which float32 (and float64) hold as 0.
    years = 40 * 365
    lists = fallback(tmp_path, [("a", years), ("a", years), ("b", years), ("c", years + 30)], k=3)
    overall = lists.filter(pl.col("category").is_null())
    assert overall["item_id"].to_list() == ["a", "b", "c"]
    scores = overall["score"].to_list()
    assert scores[0] > scores[1] > scores[2] and scores[0] - scores[1] == pytest.approx(1.0, abs=1e-3)


def test_fallback_lists_only_items_the_business_may_show(tmp_path):
    lists = fallback(tmp_path, [("a", 1), ("a", 2), ("b", 1), ("c", 1)], k=4,
                     available=[False, True, True, True],
                     available_until=[None, None, END - DAY, None])  # c was discontinued yesterday
    assert set(lists["item_id"]) == {"b"}
