"""Validation: real Great Expectations suites gate the snapshot; failures name what broke."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import polars as pl
import pytest

from schemas.config import SyntheticConfig
from tasks.ingest import generate_synthetic, ingest
from tasks.validate import ValidationFailed, validate
from tests.conftest import make_run

RUN_DATE = dt.date(2026, 11, 20)
SMALL = SyntheticConfig(n_users=60, n_items=80, n_clusters=3, events_per_user=12, n_categories=6)


def write_source(directory: Path, interactions: pl.DataFrame, items: pl.DataFrame | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    interactions.drop("event_type", "weight", strict=False).write_csv(directory / "interactions.csv")
    if items is not None:
        items.with_columns(pl.col("categories").list.join("|")).write_csv(directory / "items.csv")
    return directory


def run(tmp_path: Path, interactions: pl.DataFrame, items: pl.DataFrame | None = None, **cfg):
    source = write_source(tmp_path / "source", interactions, items)
    run = make_run(tmp_path / "ws", RUN_DATE, source=str(source), synthetic=SMALL, seed=0, validation=cfg)
    return validate(run, ingest(run))


@pytest.fixture(scope="module")
def clean():
    return generate_synthetic(SMALL, RUN_DATE, 3)


def test_valid_input_is_published_with_results_and_data_docs(tmp_path, clean):
    interactions, items = clean
    published = run(tmp_path, interactions, items)
    partition = tmp_path / "ws" / "snapshots" / f"run_date={RUN_DATE}"
    assert published.path == partition
    assert (partition / "interactions.parquet").exists() and (partition / "items.parquet").exists()
    results = [json.loads((partition / "validation" / f"{name}.json").read_text())
               for name in ("interactions", "interaction_rows")]  # the whole table's checks, then each row's
    assert all(result["success"] for result in results)
    assert sum(result["statistics"]["evaluated_expectations"] for result in results) >= 15
    assert (partition / "validation" / "docs" / "index.html").exists()
    assert list((partition / "validation" / "docs" / "validations").rglob("*.html"))
    assert not list((tmp_path / "ws" / ".tmp").iterdir())


def test_out_of_range_ratings_fail_naming_the_expectation_file_and_values(tmp_path, clean):
    interactions, items = clean
    broken = interactions.with_columns(
        pl.when(pl.int_range(pl.len()) < 3).then(9.5).otherwise(pl.col("rating")).alias("rating")
    )
    with pytest.raises(ValidationFailed) as error:
        run(tmp_path, broken, items)
    message = str(error.value)
    assert "interactions.csv: expect_column_values_to_be_between(rating): 3 offending row(s)" in message
    assert "9.5" in message
    assert not (tmp_path / "ws" / "snapshots").exists()
    quarantine = tmp_path / "ws" / "quarantine" / f"run_date={RUN_DATE}"
    reasons = json.loads((quarantine / "reasons.json").read_text())
    assert [r["expectation"] for r in reasons] == ["expect_column_values_to_be_between"]
    assert (quarantine / "interactions.parquet").exists()


def test_rows_are_validated_in_slices_and_their_failures_summed_while_sizes_count_the_whole_table(
        tmp_path, clean, monkeypatch):
    monkeypatch.setattr("tasks.validate.SLICE_ROWS", 100)
    interactions, items = clean
    n = interactions.height
    whole_table = run(tmp_path / "whole", interactions, items, min_rows=n)  # each slice holds only 100 rows
    assert len(list(whole_table.validation.glob("interaction_rows.*.json"))) == -(-n // 100) > 3
    broken = interactions.with_columns(
        pl.when(pl.int_range(pl.len()).is_in([5, n // 2, n - 1])).then(9.5).otherwise(pl.col("rating")).alias("rating"))
    with pytest.raises(ValidationFailed) as error:
        run(tmp_path / "broken", broken, items, min_rows=n + 1)
    message, rated = str(error.value), broken["rating"].count()  # GE's percentages are of the non-null values
    assert f"expect_column_values_to_be_between(rating): 3 offending row(s) ({300 / rated:.2f}%), e.g. 9.5" in message
    assert f"expect_table_row_count_to_be_between(table): observed {n}, expected min_value={n + 1}" in message
    assert message.count("expect_column_values_to_be_between(rating)") == 1


def test_interactions_with_items_missing_from_the_items_table_fail(tmp_path, clean):
    interactions, items = clean
    broken = pl.concat([interactions, interactions.head(2).with_columns(pl.lit("ghost").alias("item_id"))])
    with pytest.raises(ValidationFailed, match=r"expect_column_values_to_be_in_set\(item_id\).*ghost"):
        run(tmp_path, broken, items)


def test_a_flood_of_duplicate_events_fails_the_duplicate_rate(tmp_path, clean):
    interactions, items = clean
    flooded = pl.concat([interactions, interactions.head(interactions.height // 5)])
    with pytest.raises(ValidationFailed, match=r"expect_compound_columns_to_be_unique\(user_id,item_id,timestamp\)"):
        run(tmp_path, flooded, items)


def test_duplicate_item_ids_in_the_items_table_fail(tmp_path, clean):
    interactions, items = clean
    with pytest.raises(ValidationFailed, match=r"items.csv: expect_column_values_to_be_unique\(item_id\)"):
        run(tmp_path, interactions, pl.concat([items, items.head(1)]))


def test_too_few_users_fail_the_minimum(tmp_path, clean):
    interactions, _ = clean
    with pytest.raises(ValidationFailed, match=r"expect_column_unique_value_count_to_be_between\(user_id\)"):
        run(tmp_path, interactions, None, min_users=1000)


def _night(tmp_path: Path, day: dt.date, interactions: pl.DataFrame, items: pl.DataFrame, **config):
    source = write_source(tmp_path / f"source-{day}", interactions, items)
    run = make_run(tmp_path / "ws", day, source=str(source), synthetic=SMALL, seed=0, **config)
    return validate(run, ingest(run))


def test_drift_against_the_latest_earlier_snapshot_passes_a_normal_night_and_is_in_the_results(tmp_path):
    first, second = RUN_DATE, RUN_DATE + dt.timedelta(days=1)
    _night(tmp_path, first, *generate_synthetic(SMALL, first, 3))
    published = _night(tmp_path, second, *generate_synthetic(SMALL, second, 3))
    observed = {name: [r["result"]["observed_value"] for r in json.loads(
        (published.validation / f"drift_{name}.json").read_text())["results"]] for name in ("events", "users", "categories")}
    assert observed["events"] == [0.0, 0.0]  # the synthetic world grows: no new user or item in one day
    assert 0 <= observed["users"][0] < 0.2 and 0 <= observed["categories"][0] < 0.2


@pytest.mark.parametrize("flip, named", [
    ("users", "expect_column_mean_to_be_between(new_user): share of events from users 2026-11-20 did not have, "
              "max_new_user_share is 0.5: observed 1, expected max_value=0.5"),
    ("categories", "expect_column_kl_divergence_to_be_less_than(category): category mix of the events against "
                   "2026-11-20's (KL divergence): observed "),
])
def test_a_night_whose_users_or_category_mix_flipped_fails_validation_naming_the_figure(tmp_path, flip, named):
    first, second = RUN_DATE, RUN_DATE + dt.timedelta(days=1)
    _night(tmp_path, first, *generate_synthetic(SMALL, first, 3))
    interactions, items = generate_synthetic(SMALL, second, 3)
    if flip == "users":  # every user id new: another population, or a broken id join upstream
        interactions = interactions.with_columns(pl.format("new-{}", pl.col("user_id")).alias("user_id"))
    else:  # every item in one category
        items = items.with_columns(pl.lit(["c0"]).alias("categories"))
    with pytest.raises(ValidationFailed) as error:
        _night(tmp_path, second, interactions, items)
    assert named in str(error.value) and "\n" not in str(error.value)
    assert (tmp_path / "ws" / "quarantine" / f"run_date={second}" / "reasons.json").exists()
    assert not (tmp_path / "ws" / "snapshots" / f"run_date={second}").exists()


def test_user_ids_pseudonymised_with_a_new_key_are_not_counted_as_new_users(tmp_path):
    first, second = RUN_DATE, RUN_DATE + dt.timedelta(days=1)
    _night(tmp_path, first, *generate_synthetic(SMALL, first, 3))
    key = tmp_path / "secret.key"
    key.write_text("0123456789abcdef-not-a-real-secret")
    published = _night(tmp_path, second, *generate_synthetic(SMALL, second, 3), privacy={"key_file": str(key)})
    results = json.loads((published.validation / "drift_events.json").read_text())["results"]
    assert [r["expectation_config"]["kwargs"]["column"] for r in results] == ["new_item"]
