"""Opt-outs, pseudonyms and retention, on plain tables and directories."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from schemas.config import PrivacyConfig
from schemas.tables import ModelDir
from tasks.privacy import deleted_users, forget, protect, prune, pseudonym, read_key, record, remembers
from tasks.workspace import RecflowError

EVENTS = pl.DataFrame({"user_id": ["ann", "bob", "ann", "", None, "cy"], "item_id": list("abcdef")})


def test_deleted_users_lose_every_event_and_others_keep_theirs():
    kept = protect(EVENTS, pl.Series(["ann", "nobody"]), key=None)
    assert kept["user_id"].to_list() == ["bob", "", None, "cy"]
    assert kept["item_id"].to_list() == ["b", "d", "e", "f"]


def test_pseudonyms_are_keyed_stable_and_leave_empty_ids_for_validation():
    key, other = b"k" * 32, b"o" * 32
    hidden = protect(EVENTS, pl.Series([], dtype=pl.String), key)
    assert hidden["user_id"].to_list() == [pseudonym("ann", key), pseudonym("bob", key), pseudonym("ann", key), "", None,
                                           pseudonym("cy", key)]
    assert pseudonym("ann", key) == pseudonym("ann", key) != pseudonym("ann", other)
    assert not any("ann" in value or "bob" in value for value in hidden["user_id"].drop_nulls())


def test_the_key_must_live_outside_the_workspace_and_be_long_enough(tmp_path):
    workspace = tmp_path / "workspace"
    inside = workspace / "key"
    inside.parent.mkdir()
    inside.write_bytes(b"x" * 32)
    with pytest.raises(RecflowError, match="inside the workspace"):
        read_key(PrivacyConfig(key_file=str(inside)), workspace)
    short = tmp_path / "short"
    short.write_bytes(b"abc")
    with pytest.raises(RecflowError, match="at least 16 bytes"):
        read_key(PrivacyConfig(key_file=str(short)), workspace)
    with pytest.raises(RecflowError, match="No such file"):
        read_key(PrivacyConfig(key_file=str(tmp_path / "absent")), workspace)


def test_the_deletion_list_is_read_as_strings_and_needs_a_user_id_column(tmp_path):
    workspace = tmp_path / "workspace"
    listed = tmp_path / "deleted.csv"
    listed.write_text("user_id\n007\n42\n007\n")
    assert deleted_users(PrivacyConfig(deleted_users=str(listed)), workspace).to_list() == ["007", "42"]
    wrong = tmp_path / "wrong.csv"
    wrong.write_text("id\n1\n")
    with pytest.raises(RecflowError, match="no user_id column"):
        deleted_users(PrivacyConfig(deleted_users=str(wrong)), workspace)
    inside = workspace / "deleted.csv"
    inside.parent.mkdir()
    inside.write_text("user_id\n1\n")
    with pytest.raises(RecflowError, match="inside the workspace"):
        deleted_users(PrivacyConfig(deleted_users=str(inside)), workspace)


def test_retention_prunes_partitions_more_than_the_window_before_the_run_date(tmp_path):
    for table, day in [("recommendations", "2026-01-01"), ("recommendations", "2026-02-20"), ("snapshots", "2026-01-29"), ("quarantine", "2026-01-30"),
                       ("features", "2026-03-01"), ("fallback", "2025-12-31")]:
        (tmp_path / table / f"run_date={day}").mkdir(parents=True)
    pruned = prune(tmp_path, dt.date(2026, 3, 1), days=30)
    assert sorted(pruned) == ["fallback/run_date=2025-12-31", "recommendations/run_date=2026-01-01",
                              "snapshots/run_date=2026-01-29"]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("*/run_date=*")) == [
        "features/run_date=2026-03-01", "quarantine/run_date=2026-01-30", "recommendations/run_date=2026-02-20"]
    assert prune(tmp_path, dt.date(2030, 1, 1), days=None) == []


def test_forget_rebuilds_earlier_partitions_without_listed_users_once(tmp_path):
    import json

    recommendations = tmp_path / "recommendations" / "run_date=2026-01-01"
    snapshot = tmp_path / "snapshots" / "run_date=2026-01-01"
    features = tmp_path / "features" / "run_date=2026-01-01" / "users.parquet"
    model = tmp_path / "models" / "abc" / "vocab" / "users.parquet"
    kept_model = tmp_path / "models" / "tonight" / "vocab" / "users.parquet"
    for path in (recommendations / "part-00000.parquet", snapshot / "interactions.parquet", features, model, kept_model):
        path.parent.mkdir(parents=True, exist_ok=True)
        EVENTS.write_parquet(path)
    EVENTS.filter(pl.col("user_id") == "bob").write_parquet(recommendations / "part-00001.parquet")
    (recommendations / "_manifest.json").write_text(json.dumps({"rows": 7, "users": 5, "run_date": "2026-01-01"}))
    (snapshot / "_stage.json").write_text(json.dumps({"key": "k", "record": {"n_interactions": 6, "n_users": 5}}))
    logged = tmp_path / "mlartifacts" / "1" / "run" / "artifacts" / "recommender" / "artifacts" / "features"
    logged.mkdir(parents=True)
    pl.DataFrame({"user_id": ["ann", "bob"], "user_idx": [1, 2]}).write_parquet(logged / "users.parquet")
    pl.DataFrame({"user_idx": [1, 2, 1], "item_idx": [3, 4, 5]}).write_parquet(logged / "events.parquet")
    listed = tmp_path.parent / f"{tmp_path.name}-deleted.csv"
    listed.write_text("user_id\nann\n")
    cfg = PrivacyConfig(deleted_users=str(listed))
    kept = ModelDir(path=kept_model.parents[1])
    assert forget(tmp_path, cfg, keep=kept) == {"rewritten": 3, "removed": 2}
    table = pl.read_parquet(recommendations / "*.parquet")
    assert "ann" not in table["user_id"].to_list() and table.height == EVENTS.height - 2 + 1
    assert json.loads((recommendations / "_manifest.json").read_text()) == {"rows": 5, "users": 4, "run_date": "2026-01-01"}
    assert json.loads((snapshot / "_stage.json").read_text())["record"] == {"n_interactions": 4, "n_users": 4}
    assert not features.exists() and not model.exists() and kept_model.exists()
    assert pl.read_parquet(logged / "users.parquet").rows() == [(None, 1), ("bob", 2)]  # indices stay
    assert pl.read_parquet(logged / "events.parquet")["user_idx"].to_list() == [2]
    assert not list((tmp_path / ".tmp").glob("forget-*"))
    assert forget(tmp_path, cfg, keep=kept) == {"rewritten": 0, "removed": 0}  # applied already


def test_a_champion_counts_as_remembering_a_listed_user_unless_it_provably_cannot(tmp_path):
    workspace = tmp_path / "workspace"
    listed = tmp_path / "deleted.csv"
    listed.write_text("user_id\nann\n")
    key = tmp_path / "key"
    key.write_text("k" * 32)
    cfg, keyed = PrivacyConfig(deleted_users=str(listed)), PrivacyConfig(deleted_users=str(listed), key_file=str(key))
    models = ModelDir(path=tmp_path / "models")
    models.vocabulary.mkdir(parents=True)
    EVENTS.write_parquet(models.users)
    assert remembers(models, cfg, workspace)  # ann is in its vocabulary
    assert not remembers(models, PrivacyConfig(), workspace)  # nobody is listed
    record(models, cfg, workspace)
    assert not remembers(models, cfg, workspace)  # trained under tonight's list: ann was never in its data
    assert remembers(models, keyed, workspace)  # other pseudonyms: cannot tell, so yes
    other = tmp_path / "other.csv"
    other.write_text("user_id\nzed\n")
    models.users.unlink()  # restored from MLflow: no user vocabulary
    assert remembers(models, PrivacyConfig(deleted_users=str(other)), workspace)
