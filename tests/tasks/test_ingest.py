"""Ingestion: every source lands in the input contract (string ids, unix-second timestamps)."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.server
import threading
import zipfile
from pathlib import Path

import polars as pl
import pytest

from schemas.config import SyntheticConfig
from schemas.tables import INTERACTIONS
from tasks.ingest import fetch_movielens, generate_synthetic, ingest, read_directory, read_exclusions
from tasks.workspace import RecflowError
from tests.conftest import make_run

RUN_DATE = dt.date(2024, 3, 1)
T0 = int(dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc).timestamp())


def write_generic(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "interactions.csv").write_text(
        "user_id,item_id,timestamp,rating,event_type\n"
        "007,042,2024-01-02T03:04:05Z,4.5,view\n"
        "007,043,2024-01-02T05:04:05+02:00,3,click\n"
        "8,042,2024-01-02 03:04:06,,view\n"
        f"8,044,{T0 + 10},1,buy\n"
    )
    (directory / "items.csv").write_text(
        "item_id,title,categories,price\n"
        "042,The Answer,Drama|Sci-Fi,9.5\n"
        "043,Other,Comedy,1.0\n"
        "044,Plain,,2.0\n"
    )
    (directory / "users.csv").write_text("user_id,country\n007,NL\n8,DE\n")
    return directory


def test_generic_layout_normalises_to_the_interactions_schema(tmp_path):
    interactions, items, users = read_directory(write_generic(tmp_path / "raw"))

    assert interactions.schema == INTERACTIONS
    assert interactions["timestamp"].to_list() == [T0, T0, T0 + 1, T0 + 10]
    assert interactions["rating"].to_list() == [4.5, 3.0, None, 1.0]
    assert interactions["event_type"].to_list() == ["view", "click", "view", "buy"]
    assert interactions["weight"].null_count() == 4
    assert users["user_id"].to_list() == ["007", "8"]
    assert users["country"].to_list() == ["NL", "DE"]


def test_ids_that_look_like_numbers_keep_their_leading_zeros(tmp_path):
    interactions, items, users = read_directory(write_generic(tmp_path / "raw"))

    assert interactions["user_id"].to_list() == ["007", "007", "8", "8"]
    assert interactions["item_id"].to_list() == ["042", "043", "042", "044"]
    assert items["item_id"].to_list() == ["042", "043", "044"]


def test_item_categories_are_split_on_pipes_and_extra_columns_kept(tmp_path):
    _, items, _ = read_directory(write_generic(tmp_path / "raw"))

    assert items["categories"].dtype == pl.List(pl.String)
    by_id = {row["item_id"]: row for row in items.to_dicts()}
    assert by_id["042"]["categories"] == ["Drama", "Sci-Fi"]
    assert by_id["043"]["categories"] == ["Comedy"]
    assert not by_id["044"]["categories"]
    assert by_id["042"]["title"] == "The Answer"
    assert by_id["042"]["price"] == "9.5"


def test_parquet_unix_seconds_and_integer_ids_become_int64_seconds_and_strings(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pl.DataFrame(
        {"user_id": [42, 7], "item_id": [1, 2], "timestamp": [T0, T0 + 60], "rating": [5, 2]}
    ).write_parquet(raw / "interactions.parquet")
    pl.DataFrame({"item_id": [1, 2], "categories": [["a", "b"], []]}).write_parquet(raw / "items.parquet")

    interactions, items, users = read_directory(raw)

    assert interactions.schema == INTERACTIONS
    assert interactions["user_id"].to_list() == ["42", "7"]
    assert interactions["item_id"].to_list() == ["1", "2"]
    assert interactions["timestamp"].to_list() == [T0, T0 + 60]
    assert items["item_id"].to_list() == ["1", "2"]
    assert items["categories"].to_list() == [["a", "b"], []]
    assert users is None


def test_parquet_datetime_timestamps_become_unix_seconds(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    pl.DataFrame(
        {"user_id": ["u"], "item_id": ["i"], "timestamp": [dt.datetime(2024, 1, 2, 3, 4, 5)]}
    ).write_parquet(raw / "interactions.parquet")

    interactions, _, _ = read_directory(raw)

    assert interactions["timestamp"].to_list() == [T0]


def write_movielens(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ratings.csv").write_text(
        "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n2,1,2.5,964982224\n"
    )
    (directory / "movies.csv").write_text(
        "movieId,title,genres\n"
        "1,Toy Story (1995),Adventure|Animation|Children\n"
        '3,"Grumpier Old Men, The (1995)",(no genres listed)\n'
    )
    return directory


def test_movielens_directory_is_recognised_and_mapped(tmp_path):
    interactions, items, users = read_directory(write_movielens(tmp_path / "ml"))

    assert interactions.schema == INTERACTIONS
    assert interactions["user_id"].to_list() == ["1", "1", "2"]
    assert interactions["item_id"].to_list() == ["1", "3", "1"]
    assert interactions["timestamp"].to_list() == [964982703, 964981247, 964982224]
    assert interactions["rating"].to_list() == [4.0, 4.5, 2.5]
    by_id = {row["item_id"]: row for row in items.to_dicts()}
    assert by_id["1"]["categories"] == ["Adventure", "Animation", "Children"]
    assert by_id["3"]["title"] == "Grumpier Old Men, The (1995)"
    assert users is None


def test_movielens_no_genres_listed_means_no_categories(tmp_path):
    _, items, _ = read_directory(write_movielens(tmp_path / "ml"))

    categories = dict(zip(items["item_id"], items["categories"].to_list()))
    assert not categories["3"]


def test_missing_required_column_names_the_file_and_the_column(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "interactions.csv").write_text("user_id,item_id\nu,i\n")

    with pytest.raises(RecflowError) as error:
        read_directory(raw)

    assert "interactions.csv" in str(error.value)
    assert "timestamp" in str(error.value)


def test_movielens_ratings_without_movie_id_names_the_file_and_the_column(tmp_path):
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "ratings.csv").write_text("userId,rating,timestamp\n1,4.0,964982703\n")

    with pytest.raises(RecflowError) as error:
        read_directory(ml)

    assert "ratings.csv" in str(error.value)
    assert "movieId" in str(error.value)


def test_unparseable_rating_names_the_file_the_column_and_the_row(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "interactions.csv").write_text(f"user_id,item_id,timestamp,rating\nu,i,{T0},4\nu,j,{T0},great\n")

    with pytest.raises(RecflowError) as error:
        read_directory(raw)

    message = str(error.value)
    assert "interactions.csv" in message
    assert "'rating'" in message
    assert "great" in message
    assert "row 3" in message


def test_unparseable_timestamp_names_the_file_and_the_column(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "interactions.csv").write_text("user_id,item_id,timestamp\nu,i,2024-01-02\nu,j,yesterday\n")

    with pytest.raises(RecflowError) as error:
        read_directory(raw)

    message = str(error.value)
    assert "interactions.csv" in message
    assert "'timestamp'" in message
    assert "yesterday" in message


def test_availability_columns_are_parsed_to_bools_and_unix_seconds(tmp_path):
    source = write_generic(tmp_path / "raw")
    (source / "items.csv").write_text(
        "item_id,title,available,available_from,available_until\n"
        "042,The Answer,true,2024-01-01,\n"
        "043,Other,0,,2024-02-01T12:00:00Z\n"
        "044,Plain,,,\n"
    )
    _, items, _ = read_directory(source)
    assert items["available"].to_list() == [True, False, None]
    assert items["available_from"].to_list() == [int(dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc).timestamp()),
                                                 None, None]
    assert items["available_until"].to_list()[1] == int(dt.datetime(2024, 2, 1, 12, tzinfo=dt.timezone.utc).timestamp())


@pytest.mark.parametrize("rows, expected", [
    ("042,x,2024-03-01,2024-02-01\n", "column 'available_until' is before 'available_from' in 1 row(s) (row 2: item '042'"),
    ("042,maybe,,\n", "column 'available' has 1 value(s) that cannot be parsed (row 2: 'maybe')"),
    ("042,true,soon,\n", "column 'available_from' has 1 value(s) that cannot be parsed (row 2: 'soon')"),
])
def test_a_broken_availability_names_the_file_the_column_and_the_row(tmp_path, rows, expected):
    source = write_generic(tmp_path / "raw")
    (source / "items.csv").write_text("item_id,available,available_from,available_until\n" + rows.replace("x", "true"))
    with pytest.raises(RecflowError, match="items.csv") as error:
        read_directory(source)
    assert expected in str(error.value)


def test_exclusions_are_read_with_an_empty_user_meaning_everyone(tmp_path):
    source = write_generic(tmp_path / "raw")
    (source / "exclusions.csv").write_text("user_id,item_id,until\n007,042,2024-04-01\n,043,\n")
    exclusions = read_exclusions(source)
    assert exclusions.to_dicts() == [
        {"user_id": "007", "item_id": "042", "until": int(dt.datetime(2024, 4, 1, tzinfo=dt.timezone.utc).timestamp())},
        {"user_id": None, "item_id": "043", "until": None},
    ]
    assert read_exclusions(write_generic(tmp_path / "none")) is None


@pytest.mark.parametrize("content, expected", [
    ("user_id,item_id,reason\n007,042,returned\n", "unknown column(s) reason"),
    ("user_id,item_id,until\n007,042,next week\n", "column 'until' has 1 value(s) that cannot be parsed (row 2"),
    ("user_id,until\n007,2024-04-01\n", "missing required column(s) item_id"),
])
def test_a_broken_exclusions_table_names_the_file_and_the_problem(tmp_path, content, expected):
    source = write_generic(tmp_path / "raw")
    (source / "exclusions.csv").write_text(content)
    with pytest.raises(RecflowError, match="exclusions.csv") as error:
        read_exclusions(source)
    assert expected in str(error.value)


def test_a_table_in_two_files_is_an_error_naming_both_never_a_silent_choice(tmp_path):
    source = write_generic(tmp_path / "raw")
    pl.read_csv(source / "items.csv", infer_schema=False).write_parquet(source / "items.parquet")
    with pytest.raises(RecflowError, match="both items.parquet and items.csv hold the items table"):
        read_directory(source)


def test_a_source_that_is_not_a_directory_is_a_recflow_error(tmp_path):
    with pytest.raises(RecflowError, match="not a directory"):
        read_directory(tmp_path / "nowhere")


def test_ingest_stages_parquet_under_workspace_tmp_and_counts_the_snapshot(tmp_path):
    raw = write_generic(tmp_path / "raw")
    workspace = tmp_path / "workspace"

    snapshot = ingest(make_run(workspace, RUN_DATE, source=str(raw), seed=1))

    assert snapshot.path.parent == workspace / ".tmp"
    assert sorted(p.name for p in snapshot.path.iterdir()) == ["interactions.parquet", "items.parquet", "users.parquet"]
    assert (snapshot.n_interactions, snapshot.n_users, snapshot.n_items) == (4, 2, 3)
    assert snapshot.has_items
    assert snapshot.origin["interactions"] == str(raw / "interactions.csv")
    staged = pl.read_parquet(snapshot.interactions)
    assert staged.schema == INTERACTIONS
    assert staged["user_id"].to_list() == ["007", "007", "8", "8"]
    assert not (workspace / "snapshots").exists()


def test_ingesting_the_same_input_twice_gives_the_same_data_hash(tmp_path):
    raw = write_generic(tmp_path / "raw")
    run = make_run(tmp_path / "ws", RUN_DATE, source=str(raw), seed=1)
    first, second = ingest(run), ingest(run)
    (raw / "interactions.csv").write_text((raw / "interactions.csv").read_text() + f"9,042,{T0},2,view\n")
    changed = ingest(run)

    assert first.path != second.path
    assert first.data_hash == second.data_hash
    assert changed.data_hash != first.data_hash


# --- synthetic -----------------------------------------------------------------------

SMALL = SyntheticConfig(n_users=200, n_items=400, n_clusters=8, events_per_user=30, n_categories=16, days=90)


def test_synthetic_is_deterministic_for_a_seed_and_differs_across_seeds():
    interactions, items = generate_synthetic(SMALL, RUN_DATE, seed=3)
    again, items_again = generate_synthetic(SMALL, RUN_DATE, seed=3)
    other, _ = generate_synthetic(SMALL, RUN_DATE, seed=4)

    assert interactions.equals(again)
    assert items.equals(items_again)
    assert not interactions.equals(other)


def test_synthetic_matches_the_schema_and_sizes():
    interactions, items = generate_synthetic(SMALL, RUN_DATE, seed=3)

    assert interactions.schema == INTERACTIONS
    assert 0.5 * SMALL.n_users < interactions["user_id"].n_unique() <= SMALL.n_users  # some between two walks
    assert items.height == SMALL.n_items
    assert interactions["item_id"].is_in(items["item_id"].implode()).all()
    assert not interactions.select("user_id", "item_id").is_duplicated().any()


def test_synthetic_has_no_timestamps_on_or_after_the_run_date():
    interactions, _ = generate_synthetic(SMALL, RUN_DATE, seed=3)

    run_start = int(dt.datetime.combine(RUN_DATE, dt.time(), dt.timezone.utc).timestamp())
    assert interactions["timestamp"].max() < run_start
    assert interactions["timestamp"].min() >= run_start - SMALL.days * 86400


def test_synthetic_grows_by_a_day_from_one_date_to_the_next():
    day, next_day = dt.date(2026, 3, 10), dt.date(2026, 3, 11)
    runs = {d: generate_synthetic(SMALL, d, seed=3)[0].select("user_id", "item_id", "timestamp") for d in (day, next_day)}
    start, end = (int(dt.datetime.combine(d, dt.time(), dt.timezone.utc).timestamp()) - 3600 for d in (day, next_day))
    kept = runs[day].filter(pl.col("timestamp") >= end + 3600 - SMALL.days * 86400)  # in the next date's window
    assert kept.join(runs[next_day], on=["user_id", "item_id", "timestamp"], how="anti").is_empty()  # the past stays
    new = runs[next_day].join(runs[day], on=["user_id", "item_id", "timestamp"], how="anti")
    assert new.height > 0 and (new["timestamp"] >= start).all() and (new["timestamp"] < end).all()  # one more day
    assert runs[next_day].equals(generate_synthetic(SMALL, next_day, seed=3)[0].select(runs[day].columns))


def test_synthetic_items_have_availability_windows_and_no_events_outside_them():
    cfg = SyntheticConfig(discontinued_share=0.1, upcoming_share=0.1)
    interactions, items = generate_synthetic(cfg, RUN_DATE, 3)
    midnight = int(dt.datetime.combine(RUN_DATE, dt.time(), dt.timezone.utc).timestamp())
    upcoming, ended = items.filter(pl.col("available_from").is_not_null()), items.filter(
        pl.col("available_until").is_not_null())
    assert 0.05 < upcoming.height / items.height < 0.15 and 0.05 < ended.height / items.height < 0.15
    assert (upcoming["available_from"] > midnight + 86_400).all() and (ended["available_until"] < midnight).all()
    assert interactions.join(upcoming, on="item_id").is_empty()  # nothing happens to an item before its launch
    late = interactions.join(ended, on="item_id").filter(pl.col("timestamp") >= pl.col("available_until"))
    assert late.is_empty()


def test_a_repeat_heavy_synthetic_world_brings_users_back_to_items_they_had():
    once, _ = generate_synthetic(SyntheticConfig(), RUN_DATE, 3)
    again, _ = generate_synthetic(SyntheticConfig(repeat_share=0.3), RUN_DATE, 3)
    assert once.select("user_id", "item_id").is_duplicated().sum() == 0  # by default each item once per user
    repeats = again.select("user_id", "item_id").is_duplicated().mean()
    assert 0.2 < repeats < 0.8, repeats


def test_synthetic_users_concentrate_on_few_categories_far_more_than_chance():
    interactions, items = generate_synthetic(SMALL, RUN_DATE, seed=3)
    events = interactions.join(items.select("item_id", category=pl.col("categories").list.first()), on="item_id")

    # Probability that two events drawn from the same user share a primary category,
    # against two events drawn from everyone (what it would be without user clusters).
    per_user = events.group_by("user_id", "category").len().group_by("user_id").agg(
        same=(pl.col("len") * (pl.col("len") - 1)).sum(), pairs=pl.sum("len") * (pl.sum("len") - 1)
    )
    within_user = per_user["same"].sum() / per_user["pairs"].sum()
    share = events.group_by("category").len()["len"].to_numpy() / events.height
    chance = float((share**2).sum())

    assert within_user > 2.5 * chance


# --- GroupLens download --------------------------------------------------------------


@pytest.fixture
def grouplens(tmp_path, monkeypatch):
    """A local stand-in for files.grouplens.org serving ml-latest-small.zip (a small export
    in GroupLens' layout, made from the synthetic source) and its md5."""
    export = tmp_path / "export"
    export.mkdir()
    interactions, items = generate_synthetic(SMALL, RUN_DATE, seed=5)
    interactions.select(pl.col("user_id").str.strip_prefix("user_").alias("userId"),
                        pl.col("item_id").str.strip_prefix("item_").alias("movieId"), "rating",
                        "timestamp").write_csv(export / "ratings.csv")
    items.select(pl.col("item_id").str.strip_prefix("item_").alias("movieId"), "title",
                 pl.col("categories").list.join("|").alias("genres")).write_csv(export / "movies.csv")
    archive = tmp_path / "served" / "ml-latest-small.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for name in ("ratings.csv", "movies.csv"):
            bundle.write(export / name, f"ml-latest-small/{name}")
    served = {
        "/ml-latest-small.zip": archive.read_bytes(),
        "/ml-latest-small.zip.md5": f"MD5 (ml-latest-small.zip) = {hashlib.md5(archive.read_bytes()).hexdigest()}\n".encode(),
    }
    requests: list[str] = []
    outage = {"failures_left": 0}  # answer 503 to this many requests first

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if outage["failures_left"] > 0:
                outage["failures_left"] -= 1
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = served.get(self.path)
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    cache = tmp_path / "cache"
    monkeypatch.setenv("RECFLOW_MOVIELENS_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("RECFLOW_CACHE", str(cache))
    yield {"served": served, "requests": requests, "cache": cache, "outage": outage, "export": export}
    server.shutdown()
    server.server_close()


def test_fetch_movielens_downloads_into_the_cache_once(grouplens):
    directory = fetch_movielens("ml-latest-small")

    assert directory == grouplens["cache"] / "ml-latest-small"
    assert (directory / "ratings.csv").read_bytes() == (grouplens["export"] / "ratings.csv").read_bytes()
    assert (directory / "movies.csv").read_bytes() == (grouplens["export"] / "movies.csv").read_bytes()
    assert sorted(grouplens["requests"]) == ["/ml-latest-small.zip", "/ml-latest-small.zip.md5"]

    assert fetch_movielens("ml-latest-small") == directory
    assert len(grouplens["requests"]) == 2


def test_movielens_source_ingests_from_the_cache(grouplens, tmp_path):
    snapshot = ingest(make_run(tmp_path / "ws", RUN_DATE, source="movielens:ml-latest-small", seed=1))

    ratings = pl.read_csv(grouplens["export"] / "ratings.csv")
    assert snapshot.n_interactions == ratings.height
    assert snapshot.n_users == ratings["userId"].n_unique()
    assert snapshot.has_items
    assert snapshot.origin["interactions"] == str(grouplens["cache"] / "ml-latest-small" / "ratings.csv")


def test_a_download_with_the_wrong_md5_is_rejected_and_not_cached(grouplens):
    grouplens["served"]["/ml-latest-small.zip.md5"] = b"MD5 (ml-latest-small.zip) = " + b"0" * 32 + b"\n"

    with pytest.raises(RecflowError, match="checksum"):
        fetch_movielens("ml-latest-small")

    assert not (grouplens["cache"] / "ml-latest-small").exists()


def test_an_unknown_movielens_archive_is_a_recflow_error(grouplens):
    with pytest.raises(RecflowError, match="ml-nonexistent"):
        fetch_movielens("ml-nonexistent")

    assert grouplens["requests"] == []


def test_a_transient_server_error_is_retried_with_backoff(grouplens):
    grouplens["outage"]["failures_left"] = 2

    directory = fetch_movielens("ml-latest-small")

    assert (directory / "ratings.csv").read_bytes() == (grouplens["export"] / "ratings.csv").read_bytes()
    assert grouplens["requests"][:3] == ["/ml-latest-small.zip"] * 3  # two 503s, then the archive
