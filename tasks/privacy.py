"""Privacy: opt-outs honoured end to end, pseudonymised user ids, and retention.

Ingestion applies the first two before it writes anything, so no later stage, model,
output, MLflow run or log line can hold what they remove: users on the deletion list lose
all their events, and with a key file every user id becomes its keyed hash (HMAC-SHA256).
After a successful run, `forget` removes the listed users from what earlier runs left in
the workspace, and `prune` drops dated partitions older than the retention window.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
import logging
import shutil
from pathlib import Path

import polars as pl

from schemas.config import PrivacyConfig
from schemas.tables import DATED_TABLES, RECOMMENDER_FEATURES, STAGE_RECORD, ModelDir
from tasks.workspace import RecflowError, publish_dir, temp_dir, write_json, write_parquet

log = logging.getLogger(__name__)

REWRITTEN = ("snapshots", "quarantine", "recommendations")  # rebuilt without listed users by `forget`
FORGOTTEN = ".forgotten.json"  # which deletion list `forget` last applied to the workspace

def protect(frame: pl.DataFrame | None, deleted: pl.Series, key: bytes | None) -> pl.DataFrame | None:
    """`frame` (a table with a user_id column) without the rows of `deleted` users, its ids
    replaced by their pseudonyms when there is a `key`. Empty ids are left for validation."""
    if frame is None:
        return None
    kept = frame.filter(~pl.col("user_id").is_in(deleted.implode()).fill_null(False))
    return pseudonymise(kept, key) if key else kept


def pseudonymise(frame: pl.DataFrame, key: bytes) -> pl.DataFrame:
    """Replace `frame`'s user ids by their keyed hashes (each distinct id hashed once)."""
    ids = frame["user_id"].drop_nulls().unique().to_list()
    mapping = pl.DataFrame({"user_id": ids, "pseudonym": [pseudonym(value, key) for value in ids]},
                           schema={"user_id": pl.String, "pseudonym": pl.String})
    return (
        frame.join(mapping, on="user_id", how="left", maintain_order="left")
        .with_columns(pl.col("pseudonym").alias("user_id"))
        .drop("pseudonym")
    )


def pseudonym(user_id: str, key: bytes) -> str:
    """The id a pseudonymised run writes for `user_id`; empty ids stay empty."""
    if not user_id.strip():
        return user_id
    return "u_" + hmac.new(key, user_id.encode(), hashlib.sha256).hexdigest()[:24]


def read_key(cfg: PrivacyConfig, workspace: Path) -> bytes | None:
    """The pseudonymisation key from `cfg.key_file`, which must lie outside the workspace."""
    if cfg.key_file is None:
        return None
    return load_key(_outside(cfg.key_file, "key_file", workspace))


def load_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as error:
        raise RecflowError(f"privacy.key_file {path}: {error.strerror}") from None
    if len(key) < 16:
        raise RecflowError(f"privacy.key_file {path} holds {len(key)} bytes; use a random key of at least 16 bytes")
    return key


def deleted_users(cfg: PrivacyConfig, workspace: Path) -> pl.Series:
    """The user ids on the deletion list (`cfg.deleted_users`, outside the workspace), as
    strings, matched exactly."""
    empty = pl.Series("user_id", [], pl.String)
    if cfg.deleted_users is None:
        return empty
    path = _outside(cfg.deleted_users, "deleted_users", workspace)
    try:
        if path.suffix == ".parquet":
            table = pl.read_parquet(path)
        else:
            table = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as error:
        raise RecflowError(f"privacy.deleted_users {path}: cannot read it ({error})") from None
    if "user_id" not in table.columns:
        raise RecflowError(f"privacy.deleted_users {path}: no user_id column (found: {', '.join(table.columns)})")
    return table["user_id"].cast(pl.String).drop_nulls().unique().sort()


def _outside(value: str, field: str, workspace: Path) -> Path:
    path = Path(value).expanduser().resolve()
    if path.is_relative_to(workspace):
        raise RecflowError(f"privacy.{field} {path} lies inside the workspace {workspace}; keep it elsewhere: "
                           "the workspace must hold nothing that names or re-identifies a user")
    return path


def fingerprint(cfg: PrivacyConfig, workspace: Path) -> dict[str, str | None]:
    """What the privacy settings change in a run's data: which key (a keyed hash of a
    constant, never the key) and which deletion list (hashed with the key when there is
    one). Part of ingestion's cache key, and recorded beside every trained model."""
    key = read_key(cfg, workspace)
    listed = json.dumps(deleted_users(cfg, workspace).to_list()).encode()
    if key is None:
        return {"key": None, "deletion_list": hashlib.sha256(listed).hexdigest()[:16]}
    return {"key": hmac.new(key, b"recflow key id", hashlib.sha256).hexdigest()[:12],
            "deletion_list": hmac.new(key, listed, hashlib.sha256).hexdigest()[:16]}


def record(models: ModelDir, cfg: PrivacyConfig, workspace: Path) -> None:
    """Note beside a model's vocabulary which privacy settings its training data had."""
    write_json(fingerprint(cfg, workspace), models.privacy)


def served(user_ids: pl.Series, cfg: PrivacyConfig, workspace: Path) -> pl.Series:
    """`user_ids` as the workspace stores them (pseudonyms when the run has a key)."""
    key = read_key(cfg, workspace)
    return user_ids if key is None else pl.Series("user_id", [pseudonym(v, key) for v in user_ids.to_list()], pl.String)


def served_id(user_id: str, key_file: Path | None) -> str:
    """The id under which a user's list is published: `user_id` itself, or its pseudonym."""
    if key_file is None:
        return user_id
    return pseudonym(user_id, load_key(key_file.expanduser().resolve()))


def remembers(models: ModelDir, cfg: PrivacyConfig, workspace: Path) -> bool:
    """Whether the models in `models` may have learned from a user now on the deletion list.

    Certain when their user vocabulary is at hand; when it is not, or holds other
    pseudonyms (another key), any change of list since their training counts as yes.
    """
    deleted = served(deleted_users(cfg, workspace), cfg, workspace)
    if deleted.is_empty():
        return False
    tonight = fingerprint(cfg, workspace)
    try:
        trained = json.loads(models.privacy.read_text())
    except (OSError, ValueError):
        trained = {"key": None, "deletion_list": None}  # models from before privacy settings existed
    if trained.get("key") != tonight["key"]:
        return True
    if trained.get("deletion_list") == tonight["deletion_list"]:
        return False
    if not models.users.exists():
        return True
    return _holds(models.users, deleted)


def forget(workspace: Path, cfg: PrivacyConfig, keep: ModelDir) -> dict[str, int]:
    """Remove users on the deletion list from what earlier runs left in the workspace.

    Snapshot, quarantine and recommendation partitions that hold them are rebuilt without
    their rows in .tmp/ and swapped in whole (with their row counts updated), and so are
    the user vocabularies and feature sets that earlier runs logged to the embedded MLflow
    store (workspace/mlartifacts); feature partitions and model directories that hold them are
    removed (they are rebuilt from snapshots). `keep` (the models that scored tonight)
    stays. Runs once per deletion list. Returns counts of rewritten partitions or files
    and of removed directories.
    """
    deleted = served(deleted_users(cfg, workspace), cfg, workspace)
    marker = workspace / FORGOTTEN
    applied = fingerprint(cfg, workspace)["deletion_list"]
    if deleted.is_empty() or (marker.exists() and applied in marker.read_text()):
        return {"rewritten": 0, "removed": 0}
    rewritten = removed = 0
    for table in REWRITTEN:
        for directory in sorted((workspace / table).glob("run_date=*")):
            files = [f for f in sorted(directory.glob("*.parquet")) if "user_id" in pl.read_parquet_schema(f)]
            if any(_holds(f, deleted) for f in files):
                _rebuild_without(directory, files, deleted, workspace)
                rewritten += 1
    embedded_store = workspace / "mlartifacts"
    for logged in sorted(embedded_store.glob(f"**/models/{ModelDir.USER_VOCABULARY}")):
        if _holds(logged, deleted):
            write_parquet(pl.read_parquet(logged).filter(~pl.col("user_id").is_in(deleted.implode())), logged)
            rewritten += 1
    for logged in sorted(embedded_store.glob(f"**/{RECOMMENDER_FEATURES}/users.parquet")):
        if _holds(logged, deleted) or _holds_exclusions(logged.parent, deleted):
            _forget_in_features(logged.parent, deleted)
            rewritten += 1
    holders = {path.parent: path for path in (workspace / "features").glob("run_date=*/users.parquet")}
    trained = [ModelDir(path=directory) for directory in sorted((workspace / "models").glob("*"))]
    holders |= {models.path: models.users for models in trained if models.users.exists()}
    for directory, users in holders.items():
        if directory != keep.path and (_holds(users, deleted) or _holds_exclusions(directory, deleted)):
            _remove(directory, workspace)
            removed += 1
    write_json({"deletion_list": applied}, marker)
    log.info("privacy: removed opted-out users from %d earlier partition(s) and %d derived director(ies)",
             rewritten, removed)
    return {"rewritten": rewritten, "removed": removed}


def _forget_in_features(directory: Path, user_ids: pl.Series) -> None:
    """A logged recommender's feature set without the events and exclusions of `user_ids`, whose rows in
    its user vocabulary lose their id (the indices of the others stay as its models know
    them). Events go first: a run killed in between leaves the ids, so the next one redoes it."""
    users = pl.read_parquet(directory / "users.parquet")
    gone = users.filter(pl.col("user_id").is_in(user_ids.implode()))["user_idx"].implode()
    events = pl.read_parquet(directory / "events.parquet")
    write_parquet(events.filter(~pl.col("user_idx").is_in(gone)), directory / "events.parquet")
    if (directory / "exclusions.parquet").exists():
        exclusions = pl.read_parquet(directory / "exclusions.parquet")
        write_parquet(exclusions.filter(~pl.col("user_id").is_in(user_ids.implode())), directory / "exclusions.parquet")
    unnamed = pl.when(pl.col("user_idx").is_in(gone)).then(None).otherwise("user_id").alias("user_id")
    write_parquet(users.with_columns(unnamed), directory / "users.parquet")


def _holds_exclusions(features: Path, user_ids: pl.Series) -> bool:
    """Whether a feature set's exclusions name one of `user_ids` (a user with no events has them only there)."""
    return (features / "exclusions.parquet").exists() and _holds(features / "exclusions.parquet", user_ids)


def _holds(path: Path, user_ids: pl.Series) -> bool:
    return pl.scan_parquet(path).filter(pl.col("user_id").is_in(user_ids.implode())).head(1).collect().height > 0


def _rebuild_without(directory: Path, files: list[Path], user_ids: pl.Series, workspace: Path) -> None:
    """Publish `directory` again without the rows of `user_ids` in `files`, with the row
    and user counts of its stage record and manifest brought up to date."""
    staged = temp_dir(workspace, "forget")
    shutil.rmtree(staged)
    shutil.copytree(directory, staged)
    for file in files:
        write_parquet(pl.read_parquet(file).filter(~pl.col("user_id").is_in(user_ids.implode()).fill_null(False)),
                      staged / file.name)
    table = pl.read_parquet(staged / ("interactions.parquet" if directory.parent.name == "snapshots" else "*.parquet"))
    counts = {"n_interactions": table.height, "rows": table.height, "n_users": table["user_id"].n_unique(),
              "users": table["user_id"].n_unique()}
    for name, nested in ((STAGE_RECORD, "record"), ("_manifest.json", None)):
        if (staged / name).exists():
            payload = json.loads((staged / name).read_text())
            target = payload[nested] if nested else payload
            target.update({k: v for k, v in counts.items() if k in target})
            write_json(payload, staged / name)
    publish_dir(staged, directory)


def prune(workspace: Path, run_date: dt.date, days: int | None) -> list[str]:
    """Remove dated partitions older than `days` before `run_date`; return their names."""
    if days is None:
        return []
    oldest = run_date - dt.timedelta(days=days)
    pruned = []
    for table in DATED_TABLES:
        for directory in sorted((workspace / table).glob("run_date=*")):
            try:
                day = dt.date.fromisoformat(directory.name.removeprefix("run_date="))
            except ValueError:
                continue
            if day < oldest:
                _remove(directory, workspace)
                pruned.append(f"{table}/{directory.name}")
    if pruned:
        log.info("retention: pruned %d partition(s) older than %s", len(pruned), oldest)
    return pruned


def _remove(directory: Path, workspace: Path) -> None:
    """Remove `directory` so that readers never see it half deleted: move it into .tmp first."""
    graveyard = temp_dir(workspace, "removed")
    directory.rename(graveyard / directory.name)
    shutil.rmtree(graveyard, ignore_errors=True)
