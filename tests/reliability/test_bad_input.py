"""Broken input, one kind per test, through the real `recflow run` command (in-process).

Each bad run must end with a non-zero exit and one line naming the problem and the file,
and leave everything an earlier good run published as it was: partitions, models, the
champion alias and the MLflow history. Valid but unusual input must succeed. The lines are
collected in test-artifacts/bad-input-report.json.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from flows.cli import app
from schemas.config import SyntheticConfig
from tasks.ingest import generate_synthetic
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # ~5 minutes: a real run per kind of bad input

GOOD_DATE, BAD_DATE = dt.date(2026, 11, 10), dt.date(2026, 11, 11)
SMALL = SyntheticConfig(n_users=120, n_items=200, n_clusters=4, events_per_user=30, n_categories=8)
CONFIG = {"top_k": 5, "retrieval": {"max_epochs": 2, "batch_size": 512}, "ranking": {"max_epochs": 1}}


def run_cli(*args: str):
    return CliRunner().invoke(app, ["run", *args])


def write_source(directory: Path, interactions: pl.DataFrame, items: pl.DataFrame | None, **csv) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    interactions.write_csv(directory / "interactions.csv", **csv)
    if items is not None:
        items.write_csv(directory / "items.csv")
    return directory


def checksums(workspace: Path) -> dict[str, str]:
    """Every file an earlier run published (not staging, quarantine, lock or the MLflow db)."""
    return {
        str(path.relative_to(workspace)): hashlib.sha256(path.read_bytes()).hexdigest()
        for table in ("snapshots", "features", "models", "recommendations", "mlartifacts")
        for path in sorted((workspace / table).rglob("*"))
        if path.is_file()
    }


def mlflow_state(workspace: Path) -> tuple[int, str]:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("recflow").experiment_id])
    return len(runs), client.get_model_version_by_alias("recflow-retrieval", "champion").version


@pytest.fixture(scope="module")
def good(prefect_server, tmp_path_factory):
    base = tmp_path_factory.mktemp("bad-input")
    interactions, items = generate_synthetic(SMALL, GOOD_DATE, 5)
    interactions = interactions.select("user_id", "item_id", "timestamp", "rating")
    items = items.with_columns(pl.col("categories").list.join("|"))
    config = base / "config.json"
    config.write_text(json.dumps(CONFIG))
    workspace = base / "ws"
    source = write_source(base / "good", interactions, items)
    result = run_cli("--source", str(source), "--workspace", str(workspace), "--run-date", str(GOOD_DATE),
                     "--config", str(config))
    assert result.exit_code == 0, result.output
    before = (checksums(workspace), mlflow_state(workspace))
    report: dict[str, str] = {}
    yield {"base": base, "workspace": workspace, "config": config, "interactions": interactions, "items": items,
           "before": before, "report": report}
    out = ROOT / "test-artifacts" / "bad-input-report.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"kinds_of_bad_input_tried": len(report), "earlier_output_files": len(before[0]),
                               "mlflow_runs_and_champion_version": list(before[1]), "errors": report}, indent=2))


def _with(column: str, value, rows: int = 5):
    def change(interactions: pl.DataFrame) -> pl.DataFrame:
        return interactions.with_columns(
            pl.when(pl.int_range(pl.len()) < rows).then(pl.lit(value)).otherwise(pl.col(column).cast(pl.String))
            .alias(column)
        )
    return change


FUTURE = str(int(dt.datetime(2031, 1, 1, tzinfo=dt.timezone.utc).timestamp()))

# kind -> (how to break the good source, what the one-line error must say)
BROKEN_TABLES = {
    "header only": (lambda i, t: (i.head(0), t), "expect_table_row_count_to_be_between"),
    "missing required column": (lambda i, t: (i.drop("timestamp"), t), "missing required column(s) timestamp"),
    "renamed required column": (lambda i, t: (i.rename({"user_id": "uid"}), t), "missing required column(s) user_id"),
    "non-numeric ratings": (lambda i, t: (_with("rating", "good")(i), t), "column 'rating' has 5 value(s) that cannot"),
    "out-of-range ratings": (lambda i, t: (_with("rating", "7.5")(i), t), "expect_column_values_to_be_between(rating)"),
    "null ids": (lambda i, t: (_with("user_id", None)(i), t), "expect_column_values_to_not_be_null(user_id)"),
    "empty ids": (lambda i, t: (_with("item_id", "  ")(i), t), "expect_column_values_to_match_regex(item_id)"),
    "future timestamps": (lambda i, t: (_with("timestamp", FUTURE)(i), t), "expect_column_values_to_be_between(timestamp)"),
    "negative timestamps": (lambda i, t: (_with("timestamp", "-5")(i), t), "expect_column_values_to_be_between(timestamp)"),
    "flood of exact duplicates": (lambda i, t: (pl.concat([i, i.head(i.height // 3)]), t),
                                  "expect_compound_columns_to_be_unique"),
    "items table with duplicate ids": (lambda i, t: (i, pl.concat([t, t.head(3)])),
                                       "expect_column_values_to_be_unique(item_id)"),
    "interactions naming unknown items": (lambda i, t: (_with("item_id", "no-such-item")(i), t),
                                          "expect_column_values_to_be_in_set(item_id)"),
    "changed column type (timestamps as words)": (lambda i, t: (_with("timestamp", "yesterday")(i), t),
                                                  "column 'timestamp' has 5 value(s) that cannot be parsed"),
    "sudden drop in volume": (lambda i, t: (i.head(i.height // 3), t), "volume drop: 2026-11-10 had"),
}


@pytest.mark.parametrize("kind", BROKEN_TABLES)
def test_broken_table_fails_in_one_line_and_keeps_earlier_output(good, kind):
    breaking, expected = BROKEN_TABLES[kind]
    interactions, items = breaking(good["interactions"], good["items"])
    source = write_source(good["base"] / kind.replace(" ", "-"), interactions, items)
    _expect_failure(good, kind, ["--source", str(source)], expected, "items.csv" if "items table" in kind else "interactions.csv")


def _items_with(**columns):
    """The good items table with availability columns: a value for every row, or one for the first 3 rows."""
    def change(items: pl.DataFrame) -> pl.DataFrame:
        return items.with_columns(
            (pl.lit(value) if isinstance(value, str) else pl.when(pl.int_range(pl.len()) < 3).then(pl.lit(value[0])))
            .alias(name) for name, value in columns.items())
    return change


# kind -> (change to the items table or None, an exclusions.csv or None, what the one line says, the file it names)
BROKEN_RULES = {
    "availability window that ends before it starts": (
        _items_with(available_from=("2026-11-05",), available_until=("2026-11-01",)), None,
        "column 'available_until' is before 'available_from' in 3 row(s) (row 2", "items.csv"),
    "availability that is not true or false": (_items_with(available=("maybe",)), None,
                                               "column 'available' has 3 value(s) that cannot be parsed", "items.csv"),
    "no item servable on the run date": (_items_with(available="false"), None,
                                         "no item is servable on 2026-11-11", "items.csv"),
    "exclusions with an unknown column": (None, "user_id,item_id,reason\nuser_1,item_1,returned\n",
                                          "unknown column(s) reason", "exclusions.csv"),
    "exclusions with an unparseable until": (None, "user_id,item_id,until\nuser_1,item_1,next week\n",
                                             "column 'until' has 1 value(s) that cannot be parsed (row 2", "exclusions.csv"),
    "exclusions naming no item": (None, "user_id,item_id\nuser_1,\n", "expect_column_values_to_not_be_null(item_id)",
                                  "exclusions.csv"),
}


@pytest.mark.parametrize("kind", BROKEN_RULES)
def test_broken_business_rules_fail_in_one_line_and_keep_earlier_output(good, kind):
    items_change, exclusions, expected, file = BROKEN_RULES[kind]
    items = items_change(good["items"]) if items_change else good["items"]
    source = write_source(good["base"] / kind.replace(" ", "-"), good["interactions"], items)
    if exclusions:
        (source / "exclusions.csv").write_text(exclusions)
    _expect_failure(good, kind, ["--source", str(source)], expected, file)


BROKEN_FILES = {
    "empty file": (b"", "cannot be read as csv"),
    "wrong delimiter": (b"user_id;item_id;timestamp\n1;2;1700000000\n", "looks ';'-separated"),
    "binary garbage": (bytes(range(256)) * 8, "cannot be read as csv"),
    "non-UTF-8 bytes": (b"user_id,item_id,timestamp\n\xff\xfeu1,i1,1700000000\n", "invalid utf-8"),
}


@pytest.mark.parametrize("kind", BROKEN_FILES)
def test_unreadable_file_fails_in_one_line_and_keeps_earlier_output(good, kind):
    content, expected = BROKEN_FILES[kind]
    source = good["base"] / kind.replace(" ", "-")
    source.mkdir()
    (source / "interactions.csv").write_bytes(content)
    _expect_failure(good, kind, ["--source", str(source)], expected, "interactions.csv")


def test_two_files_for_one_table_fail_in_one_line_naming_both(good):
    source = write_source(good["base"] / "two-files", good["interactions"], good["items"])
    good["interactions"].head(good["interactions"].height // 2).write_parquet(source / "interactions.parquet")  # stale
    _expect_failure(good, "two files for one table", ["--source", str(source)],
                    "both interactions.parquet and interactions.csv hold the interactions table", None)


def test_truncated_parquet_fails_in_one_line_and_keeps_earlier_output(good):
    source = good["base"] / "truncated"
    source.mkdir()
    good["interactions"].write_parquet(source / "interactions.parquet")
    data = (source / "interactions.parquet").read_bytes()
    (source / "interactions.parquet").write_bytes(data[: len(data) // 2])
    _expect_failure(good, "truncated parquet", ["--source", str(source)], "cannot be read as parquet",
                    "interactions.parquet")


BAD_ARGUMENTS = {
    "run date that is not a date": (["--run-date", "2026-02-30"], "--run-date '2026-02-30' is not a date", 2),
    "source path that does not exist": (["--source", "/nonexistent/export"], "'/nonexistent/export' is not a directory", 1),
    "workspace that is not writable": (["--workspace", "/proc/recflow-ws"], "is not writable", 1),
    "workspace outside itself ('..')": (["--workspace", "ws/../../elsewhere"], "must not contain '..'", 1),
}


@pytest.mark.parametrize("kind", BAD_ARGUMENTS)
def test_bad_argument_fails_in_one_line(good, kind):
    arguments, expected, code = BAD_ARGUMENTS[kind]
    _expect_failure(good, kind, arguments, expected, None, code)


def _expect_failure(good, kind: str, arguments: list[str], expected: str, file: str | None, code: int = 1) -> None:
    defaults = {"--workspace": str(good["workspace"]), "--run-date": str(BAD_DATE),
                "--source": str(good["base"] / "good"), "--config": str(good["config"])}
    for flag, value in zip(arguments[::2], arguments[1::2]):
        defaults[flag] = value
    result = run_cli(*[part for pair in defaults.items() for part in pair])
    line = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else ""
    assert result.exit_code == code, result.output
    assert line.startswith("recflow: error: ") and expected in line, line
    if file:
        assert file in line, line
    assert not re.search(r"user_\d", line)  # no user id (user_<n> here) is ever echoed
    for table in ("features", "recommendations"):
        assert not (good["workspace"] / table / f"run_date={BAD_DATE}").exists()
    if good["workspace"] == Path(defaults["--workspace"]):
        assert (checksums(good["workspace"]), mlflow_state(good["workspace"])) == good["before"]  # all kept
    good["report"][kind] = line


def test_the_matrix_tries_at_least_twenty_kinds_of_bad_input():
    assert len(BROKEN_TABLES) + len(BROKEN_RULES) + len(BROKEN_FILES) + 2 + len(BAD_ARGUMENTS) >= 20


def test_unusual_but_valid_input_succeeds_and_bad_rows_under_the_threshold_are_quarantined(good, caplog):
    interactions, items = good["interactions"], good["items"]
    users = interactions["user_id"].unique().sort()
    renamed = {users[0]: "007", users[1]: "🎬 fan ✓", users[2]: "ü" * 300, users[3]: "0042"}
    odd = interactions.with_columns(pl.col("user_id").replace(renamed), pl.lit("mobile").alias("device"))
    bad_rows = odd.head(4).with_columns(pl.lit(9.9).alias("rating"))  # 4 of ~3,600 rows
    unseen = pl.DataFrame({"item_id": ["never-seen-1", "never-seen-2"], "title": ["Lonely", "Alone"],
                           "categories": ["c1", "c2"]})
    source = write_source(good["base"] / "unusual", pl.concat([odd, bad_rows]),
                          pl.concat([items, unseen], how="diagonal"))  # the unseen items have no availability
    config = good["base"] / "lenient.json"
    config.write_text(json.dumps(CONFIG | {"validation": {"max_bad_row_fraction": 0.01}}))
    workspace = good["base"] / "unusual-ws"
    result = run_cli("--source", str(source), "--workspace", str(workspace), "--run-date", str(BAD_DATE),
                     "--config", str(config))
    assert result.exit_code == 0, result.output
    assert "column(s) device are not part of the input contract" in caplog.text  # allowed, reported
    table = pl.read_parquet(workspace / "recommendations" / f"run_date={BAD_DATE}" / "*.parquet")
    assert set(renamed.values()) <= set(table["user_id"])  # "007" stays "007", emoji and long ids intact
    quarantined = pl.read_parquet(workspace / "quarantine" / f"run_date={BAD_DATE}" / "rows.parquet")
    assert quarantined.height == 4 and set(quarantined["reason"]) == {"rating outside [0.0, 5.0]"}
    snapshot = pl.read_parquet(workspace / "snapshots" / f"run_date={BAD_DATE}" / "interactions.parquet")
    assert snapshot.height == odd.height

    above = good["base"] / "too-many-bad"
    write_source(above, pl.concat([odd, odd.head(100).with_columns(pl.lit(9.9).alias("rating"))]), items)
    _expect_failure(good, "bad rows above max_bad_row_fraction",
                    ["--source", str(above), "--workspace", str(workspace), "--config", str(config)],
                    "more than max_bad_row_fraction 1.0% allows: 100 x rating outside [0.0, 5.0]", "interactions.csv")


def test_a_single_user_is_valid_input(good):
    interactions, items = good["interactions"], good["items"]
    one = interactions.filter(pl.col("user_id") == interactions["user_id"][0])
    many = pl.concat([one.with_columns(pl.col("timestamp") + shift) for shift in range(1, 4)])  # 4x the events
    source = write_source(good["base"] / "single-user", pl.concat([one, many]), items)
    config = good["base"] / "single.json"
    config.write_text(json.dumps(CONFIG | {"validation": {"min_rows": 1, "min_users": 1, "min_items": 1}}))
    workspace = good["base"] / "single-ws"
    result = run_cli("--source", str(source), "--workspace", str(workspace), "--run-date", str(BAD_DATE),
                     "--config", str(config))
    assert result.exit_code == 0, result.output
    table = pl.read_parquet(workspace / "recommendations" / f"run_date={BAD_DATE}" / "*.parquet")
    assert table["user_id"].unique().to_list() == [one["user_id"][0]] and table.height == 5


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_mlflow_server_fails_the_run_before_any_work(good):
    url = f"http://127.0.0.1:{_closed_port()}"
    workspace = good["base"] / "no-mlflow"
    result = CliRunner().invoke(app, ["run", "--source", str(good["base"] / "good"), "--workspace", str(workspace),
                                      "--run-date", str(BAD_DATE), "--config", str(good["config"])],
                                env={"MLFLOW_TRACKING_URI": url})
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"recflow: error: MLflow tracking server {url} is unreachable")
    assert not (workspace / "snapshots").exists()


def test_an_unreachable_prefect_api_fails_the_run_at_once(tmp_path):
    import os
    import subprocess
    import sys

    url = f"http://127.0.0.1:{_closed_port()}/api"
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--workspace", str(tmp_path / "ws"), "--run-date", str(BAD_DATE)],
        capture_output=True, text=True, cwd=ROOT, timeout=120, env=os.environ | {"PREFECT_API_URL": url},
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith(f"recflow: error: Prefect API {url} is unreachable")
    assert not (tmp_path / "ws" / "snapshots").exists()


def test_a_temporary_prefect_server_that_cannot_start_fails_the_run_in_one_line(tmp_path):
    import os
    import subprocess
    import sys

    database = tmp_path / "not-a-directory"
    database.write_text("")  # the server's database would live under a file: it cannot start
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {
        "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{database}/prefect.db"}
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--workspace", str(tmp_path / "ws"), "--run-date", str(BAD_DATE)],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=env,
    )
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "recflow: error: Prefect's temporary server exited at start"), result.stderr[-2000:]
    assert not (tmp_path / "ws" / "snapshots").exists()
