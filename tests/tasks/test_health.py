"""The list-health figures and thresholds (tasks/health.py), on lists made by hand."""

from __future__ import annotations

import numpy as np
import polars as pl

from schemas.config import MonitoringConfig
from tasks.health import breaches, figures, psi

ITEMS = [f"i{n}" for n in range(40)]
POPULARITY = pl.DataFrame({"item_id": ITEMS, "events": list(range(40, 0, -1))})


def lists(users: int, pick) -> pl.DataFrame:
    """`users` users' top-5 lists, user u holding pick(u, rank)."""
    rows = [(f"u{u}", ITEMS[pick(u, r)], float(5 - r)) for u in range(users) for r in range(5)]
    return pl.DataFrame(rows, schema=["user_id", "item_id", "score"], orient="row")


def spread(u: int, r: int) -> int:
    return (u * 5 + r) % 40


def test_the_same_lists_two_nights_are_healthy():
    tonight = lists(20, spread)
    found = figures(tonight, tonight, POPULARITY, n_users=20, n_servable=40, top_k=5)
    assert found["new_lists"] == 0 and found["overlap"] == 1 and found["short_lists"] == 0
    assert found["coverage"] == 1 and found["coverage_change"] == 1 and found["popularity_change"] == 1
    assert found["score_psi"] == 0 and found["users_compared"] == 20
    assert breaches(found, MonitoringConfig(), 5) == []


def test_every_user_handed_the_same_items_breaks_coverage_and_popularity():
    before, tonight = lists(20, spread), lists(20, lambda u, r: r)  # the 5 most popular items for everyone
    found = figures(tonight, before, POPULARITY, n_users=20, n_servable=40, top_k=5)
    assert found["coverage"] == 5 / 40 and found["coverage_change"] == 5 / 40
    assert found["popularity_change"] > 1.5
    broken = breaches(found, MonitoringConfig(), 5)
    assert any(b.startswith("coverage_change 0.1250 (coverage@5 over the last published lists') is below "
                            "monitoring.min_coverage_change 0.5") for b in broken), broken


def test_half_the_lists_dropped_or_cut_short_breaks_short_lists():
    full = lists(20, spread)
    dropped = full.filter(pl.col("user_id").str.slice(1).cast(pl.Int32) % 2 == 0)
    assert figures(dropped, full, POPULARITY, 20, 40, 5)["short_lists"] == 0.5
    cut = full.filter(pl.int_range(pl.len()).over("user_id") < 3)
    found = figures(cut, None, POPULARITY, 20, 40, 5)
    assert found["short_lists"] == 1 and "overlap" not in found  # the first night: nothing to compare
    assert breaches(found, MonitoringConfig(), 5) == [
        "short_lists 1.0000 (share of users with fewer than 5 items) is above monitoring.max_short_lists 0.05"]
    # a catalogue smaller than top_k: lists as long as the catalogue are complete
    assert figures(cut, None, POPULARITY, 20, n_servable=3, top_k=5)["short_lists"] == 0


def test_entirely_new_lists_break_new_lists_and_overlap_and_a_check_turns_off_with_none():
    before, tonight = lists(20, spread), lists(20, lambda u, r: (spread(u, r) + 20) % 40)
    found = figures(tonight, before, POPULARITY, 20, 40, 5)
    assert found["new_lists"] == 1 and found["overlap"] == 0
    names = [b.split()[0] for b in breaches(found, MonitoringConfig(), 5)]
    assert names == ["new_lists", "overlap"]
    assert breaches(found, MonitoringConfig(max_new_lists=None, min_overlap=None), 5) == []


def test_psi_is_zero_for_the_same_scores_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=5000)
    assert psi(scores, scores) == 0
    assert psi(scores, rng.normal(size=5000)) < 0.05
    assert psi(scores, scores + 1) > 0.5 and psi(scores, scores + 3) > psi(scores, scores + 1)


def test_the_last_published_partition_passes_over_one_that_cannot_be_read(tmp_path):
    import datetime as dt

    from tasks.health import last_published

    assert last_published(tmp_path, dt.date(2026, 11, 20)) is None  # the first night
    good, damaged, later = (tmp_path / "recommendations" / f"run_date=2026-11-{day}" for day in (17, 18, 21))
    for path in (good, damaged, later):
        path.mkdir(parents=True)
    lists(3, spread).write_parquet(good / "part-00000.parquet")
    (damaged / "part-00000.parquet").write_bytes(b"")
    lists(3, spread).write_parquet(later / "part-00000.parquet")
    assert last_published(tmp_path, dt.date(2026, 11, 20)) == good
