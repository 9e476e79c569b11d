"""Features: vocabularies, the per-user time split, history sequences and item content."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest

from schemas.tables import EVENTS
from tasks.features import event_histories, load_features, user_histories
from tasks.featurize import build_features
from tasks.ingest import ingest
from tests.conftest import make_run

RUN_DATE = dt.date(2024, 3, 1)

# alice: 10 events, bob: 7 (one item seen twice), carol: 4 (too few to hold out from).
INTERACTIONS = [
    *[("alice", f"i{k:02d}", 1000 + k) for k in range(1, 11)],
    ("bob", "i06", 1990),  # seen again at 2005: only the latest counts
    ("bob", "i03", 2001),
    ("bob", "i05", 2002),
    ("bob", "i02", 2003),
    ("bob", "i04", 2004),
    ("bob", "i06", 2005),
    ("bob", "i07", 2006),  # same second as i01: ties break by item id, so i01 comes first
    ("bob", "i01", 2006),
    ("carol", "i11", 3001),
    ("carol", "i02", 3002),
    ("carol", "i05", 3003),
    ("carol", "i01", 3004),
]
ITEMS = {
    "i01": ("The Red Star", "Drama|Comedy"),
    "i02": ("Red Moon", "Drama"),
    "i03": ("the star of red", "Action|Drama"),
    "i04": ("Blue 2 Moon", "Comedy"),
    **{f"i{k:02d}": ("X", "") for k in range(5, 13)},  # i12 is in the catalogue, never interacted with
}


@pytest.fixture
def built(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pl.DataFrame(INTERACTIONS, schema=["user_id", "item_id", "timestamp"], orient="row").write_csv(
        raw / "interactions.csv"
    )
    pl.DataFrame(
        [(item, title, categories) for item, (title, categories) in ITEMS.items()],
        schema=["item_id", "title", "categories"],
        orient="row",
    ).write_csv(raw / "items.csv")
    workspace = tmp_path / "workspace"
    run = make_run(workspace, RUN_DATE, source=str(raw), seed=0)
    feature_set = build_features(run, ingest(run))
    return workspace, feature_set, load_features(feature_set.path)


def item_ids(features, split: str, user_id: str) -> list[str]:
    user_idx = features.users.filter(pl.col("user_id") == user_id)["user_idx"].item()
    events = features.events.filter((pl.col("user_idx") == user_idx) & (pl.col("split") == split))
    item_id = dict(features.items.select("item_idx", "item_id").rows())
    return [item_id[item_idx] for item_idx in events["item_idx"]]


def test_users_and_items_get_contiguous_indices_from_one_in_id_order(built):
    _, feature_set, features = built

    assert features.users.select("user_id", "user_idx").rows() == [("alice", 1), ("bob", 2), ("carol", 3)]
    assert features.items["item_id"].to_list() == sorted(ITEMS)
    assert features.items["item_idx"].to_list() == list(range(1, 13))
    assert (feature_set.n_users, feature_set.n_items) == (3, 12)


def test_catalogue_items_without_events_are_indexed_with_zero_popularity(built):
    _, _, features = built

    popularity = dict(features.items.select("item_id", "popularity").rows())
    assert popularity["i12"] == 0
    assert popularity["i01"] == 3
    assert popularity["i06"] == 2  # bob's two i06 events count once


def test_latest_fifth_rounded_up_is_test_and_the_events_before_are_valid(built):
    _, _, features = built

    assert item_ids(features, "test", "alice") == ["i09", "i10"]  # ceil(10 * 0.2) = 2
    assert item_ids(features, "valid", "alice") == ["i08"]  # ceil(8 * 0.1) = 1
    assert item_ids(features, "fit", "alice") == [f"i{k:02d}" for k in range(1, 8)]


def test_split_orders_by_time_then_item_id_and_keeps_a_repeated_item_at_its_latest_time(built):
    _, _, features = built

    assert item_ids(features, "test", "bob") == ["i01", "i07"]  # ceil(7 * 0.2) = 2
    assert item_ids(features, "valid", "bob") == ["i06"]
    assert item_ids(features, "fit", "bob") == ["i03", "i05", "i02", "i04"]


def test_users_with_fewer_than_min_user_events_are_all_fit(built):
    _, feature_set, features = built

    assert item_ids(features, "fit", "carol") == ["i11", "i02", "i05", "i01"]
    assert item_ids(features, "test", "carol") == item_ids(features, "valid", "carol") == []
    assert feature_set.split_sizes == {"fit": 15, "valid": 2, "test": 4}


def test_events_follow_the_events_schema_sorted_by_user_and_time(built):
    _, _, features = built

    assert features.events.schema == EVENTS
    assert features.events.height == 21
    assert features.events.equals(features.events.sort("user_idx", "timestamp", "item_idx", maintain_order=True))


def test_categories_become_indices_by_how_many_items_carry_them(built):
    _, feature_set, features = built

    # Drama on 3 items -> 1, Comedy on 2 -> 2, Action on 1 -> 3; each list sorted by index.
    categories = dict(features.items.select("item_id", "categories_idx").rows())
    assert categories["i01"] == [1, 2]
    assert categories["i02"] == [1]
    assert categories["i03"] == [1, 3]
    assert categories["i04"] == [2]
    assert categories["i05"] == []
    assert feature_set.n_categories == 3
    assert features.item_categories[1].tolist() == [1, 2, 0, 0, 0, 0, 0, 0]
    assert features.item_categories[0].tolist() == [0] * 8


def test_title_words_in_at_least_two_items_become_lowercase_token_indices(built):
    _, feature_set, features = built

    # red (3 titles) = 1, then moon, star, the (2 each) alphabetically; "of", "blue",
    # the digit "2" and one-letter "X" are dropped.
    titles = dict(features.items.select("item_id", "title_idx").rows())
    assert titles["i01"] == [1, 3, 4]
    assert titles["i02"] == [1, 2]
    assert titles["i03"] == [1, 3, 4]
    assert titles["i04"] == [2]
    assert titles["i05"] == []
    assert feature_set.n_title_tokens == 4


def test_features_are_published_under_the_run_date_partition(built):
    workspace, feature_set, _ = built

    assert feature_set.path == workspace / "features" / "run_date=2024-03-01"
    assert sorted(p.name for p in feature_set.path.iterdir()) == [
        "_stage.json", "events.parquet", "items.parquet", "rules.json", "users.parquet",
    ]
    stage = json.loads((feature_set.path / "_stage.json").read_text())
    assert stage["key"] == feature_set.key != "" and stage["record"]["split_sizes"] == {"fit": 15, "valid": 2, "test": 4}
    assert not any(p.name.startswith("features-") for p in (workspace / ".tmp").iterdir())


def test_user_histories_give_each_users_latest_items_newest_first(built):
    _, _, features = built
    fit = features.events.filter(pl.col("split") == "fit")

    history = user_histories(fit, features.n_users, length=5)

    assert history.shape == (4, 5)
    assert history[0].tolist() == [0] * 5
    assert history[1].tolist() == [7, 6, 5, 4, 3]  # alice's fit items i07..i03
    assert history[2].tolist() == [4, 2, 5, 3, 0]  # bob: i04, i02, i05, i03, padding
    assert history[3].tolist() == [1, 5, 2, 11, 0]  # carol


def test_user_histories_leave_users_without_events_as_padding():
    events = pl.DataFrame({"user_idx": [2, 2], "item_idx": [8, 9]})

    history = user_histories(events, n_users=3, length=3)

    assert history.tolist() == [[0, 0, 0], [0, 0, 0], [9, 8, 0], [0, 0, 0]]


def test_event_histories_give_previous_items_newest_first_without_crossing_users():
    events = pl.DataFrame({"user_idx": [1, 1, 1, 1, 2, 2], "item_idx": [5, 6, 7, 8, 9, 10]})

    history = event_histories(events, length=2)

    assert history.tolist() == [[0, 0], [5, 0], [6, 5], [7, 6], [0, 0], [9, 0]]
