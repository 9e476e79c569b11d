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
import logging
import shutil
from pathlib import Path

import polars as pl

from schemas.config import PrivacyConfig
from tasks.workspace import RecflowError, stage_key, temp_dir, write_json, write_parquet

log = logging.getLogger(__name__)

DATED_TABLES = ("snapshots", "quarantine", "features", "recommendations", "fallback", "similar_items")
REWRITTEN = ("snapshots", "quarantine", "recommendations")  # user rows filtered out in place; other tables removed
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
    ids = frame["user_id"].drop_nulls().unique()
    mapping = pl.DataFrame({"user_id": ids, "pseudonym": [pseudonym(value, key) for value in ids.to_list()]})
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
    path = Path(cfg.key_file).expanduser().resolve()
    if path.is_relative_to(workspace):
        raise RecflowError(f"privacy.key_file {path} lies inside the workspace {workspace}; keep the key elsewhere, "
                           "so nothing the pipeline writes holds what reverses the pseudonyms")
    return load_key(path)


def load_key(path: Path) -> bytes:
    try:
        key = path.read_bytes().strip()
    except OSError as error:
        raise RecflowError(f"privacy.key_file {path}: {error.strerror}") from None
    if len(key) < 16:
        raise RecflowError(f"privacy.key_file {path} holds {len(key)} bytes; use a random key of at least 16 bytes")
    return key


def deleted_users(cfg: PrivacyConfig) -> pl.Series:
    """The user ids on the deletion list (`cfg.deleted_users`), as strings."""
    empty = pl.Series("user_id", [], pl.String)
    if cfg.deleted_users is None:
        return empty
    path = Path(cfg.deleted_users).expanduser()
    try:
        if path.suffix == ".parquet":
            table = pl.read_parquet(path)
        else:
            table = pl.read_csv(path, infer_schema=False)
    except (OSError, pl.exceptions.PolarsError) as error:
        raise RecflowError(f"privacy.deleted_users {path}: cannot read it ({error})") from None
    if "user_id" not in table.columns:
        raise RecflowError(f"privacy.deleted_users {path}: no user_id column (found: {', '.join(table.columns)})")
    return table["user_id"].cast(pl.String).drop_nulls().str.strip_chars().unique().sort()


def fingerprint(cfg: PrivacyConfig, workspace: Path) -> str:
    """What ingestion's output depends on here: the deletion list's content and the key
    (through a keyed hash of a constant, so the key itself never enters a cache key)."""
    key = read_key(cfg, workspace)
    key_id = hmac.new(key, b"recflow key id", hashlib.sha256).hexdigest()[:12] if key else None
    return stage_key(deleted_users(cfg).to_list(), key_id)


def served(user_ids: pl.Series, cfg: PrivacyConfig, workspace: Path) -> pl.Series:
    """`user_ids` as the workspace stores them (pseudonyms when the run has a key)."""
    key = read_key(cfg, workspace)
    return user_ids if key is None else pl.Series("user_id", [pseudonym(v, key) for v in user_ids.to_list()], pl.String)


def served_id(user_id: str, key_file: Path | None) -> str:
    """The id under which a user's list is published: `user_id` itself, or its pseudonym."""
    if key_file is None:
        return user_id
    return pseudonym(user_id, load_key(key_file.expanduser().resolve()))


def remembers(models: Path, cfg: PrivacyConfig, workspace: Path) -> bool:
    """Whether the models in `models` were trained with a user now on the deletion list."""
    vocabulary = models / "vocab" / "users.parquet"
    deleted = served(deleted_users(cfg), cfg, workspace)
    if deleted.is_empty() or not vocabulary.exists():
        return False
    return not pl.read_parquet(vocabulary, columns=["user_id"]).filter(pl.col("user_id").is_in(deleted.implode())).is_empty()


def forget(workspace: Path, cfg: PrivacyConfig, keep: Path) -> dict[str, int]:
    """Remove users on the deletion list from what earlier runs left in the workspace:
    their rows from published snapshot, quarantine and recommendation files (rewritten
    atomically), and whole feature partitions and model directories that hold them (both
    are rebuilt from snapshots). `keep` (the models that scored tonight) stays. Runs once
    per deletion list. Returns counts of rewritten files and removed directories."""
    deleted = served(deleted_users(cfg), cfg, workspace)
    marker = workspace / FORGOTTEN
    applied = stage_key(deleted.to_list())
    if deleted.is_empty() or (marker.exists() and applied in marker.read_text()):
        return {"rewritten": 0, "removed": 0}
    listed = pl.col("user_id").is_in(deleted.implode())
    rewritten = removed = 0
    for table in REWRITTEN:
        for file in sorted((workspace / table).glob("run_date=*/*.parquet")):
            if "user_id" in pl.read_parquet_schema(file) and pl.scan_parquet(file).filter(listed).head(1).collect().height:
                write_parquet(pl.read_parquet(file).filter(~listed.fill_null(False)), file)
                rewritten += 1
    holders = {path.parent: path for path in (workspace / "features").glob("run_date=*/users.parquet")}
    holders |= {path.parent.parent: path for path in (workspace / "models").glob("*/vocab/users.parquet")}
    for directory, users in holders.items():
        if directory != keep and pl.scan_parquet(users).filter(listed).head(1).collect().height:
            _remove(directory, workspace)
            removed += 1
    write_json({"deletion_list": applied}, marker)
    log.info("privacy: removed opted-out users from %d earlier file(s) and %d derived director(ies)", rewritten, removed)
    return {"rewritten": rewritten, "removed": removed}


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
