"""The workspace: where every run writes, and the one writer of published files.

Everything a run publishes goes through `publish_dir` or `write_parquet`/`write_json`:
written under a temp name, fsynced, then renamed into place, so a reader sees a file or
partition whole or not at all. `published_list` reads one user's list back (for `recflow
recs` and `explain`: polars only, no model code).

Stage outputs are cached by content: a stage stamps its output directory with the hash
of everything the output was computed from (`stage_key`: the upstream record's key, the
config sections it reads, the code version), and a later run whose key matches `reuse`s
the output instead of recomputing it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import TypeVar

import polars as pl
from pydantic import BaseModel

from schemas.tables import STAGE_RECORD, StageRecord, partition

log = logging.getLogger(__name__)

Record = TypeVar("Record", bound=StageRecord)
ROW_GROUP = 131_072  # rows per row group of `write_parquet_blocks`
PACKAGES = ("flows", "tasks", "schemas")  # the shipped source: every file of these is part of the code version


class RecflowError(Exception):
    """An error the user can cause and fix (bad input, path, date or config).

    The CLI prints it as one line and exits non-zero, without a traceback.
    """


@contextlib.contextmanager
def locked(workspace: Path):
    """Hold the workspace for one run: a second run on it fails at once, with who holds it.

    An advisory `flock` on workspace/.lock: the kernel releases it when the holder exits,
    however it exits, so a killed run never leaves the workspace locked.
    """
    workspace.mkdir(parents=True, exist_ok=True)
    handle = open(workspace / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RecflowError(
            f"workspace {workspace} is in use by another run ({holder}); wait for it to finish or use another --workspace"
        ) from None
    try:
        handle.truncate(0)
        handle.write(f"pid {os.getpid()}, started {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M:%S} UTC")
        handle.flush()
        yield
    finally:
        handle.truncate(0)
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def temp_dir(workspace: Path, name: str) -> Path:
    """A fresh directory under workspace/.tmp, on the same filesystem as the outputs."""
    path = workspace / ".tmp" / f"{name}-{uuid.uuid4().hex[:12]}"
    path.mkdir(parents=True)
    return path


def clean_temp(workspace: Path) -> None:
    """Remove what runs that died left behind in workspace/.tmp."""
    shutil.rmtree(workspace / ".tmp", ignore_errors=True)


def stage_key(*parts: object) -> str:
    """Content hash of what a stage's output depends on: upstream keys, config, run date."""
    plain = [part.model_dump(mode="json") if isinstance(part, BaseModel) else part for part in parts]
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]


def reuse(path: Path, key: str, record_type: type[Record]) -> Record | None:
    """The record a stage left in `path` when it was computed from `key`, marked reused and
    pointing at `path` (a workspace may have moved since); None otherwise."""
    try:
        stored = json.loads((path / STAGE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    if stored.get("key") != key:
        return None
    log.info("reused %s (same input, config and code: key %s)", path, key)
    found = record_type.model_validate(stored["record"]).model_copy(update={"reused": True})
    return found.model_copy(update={"path": path}) if "path" in record_type.model_fields else found


def stamp(directory: Path, record: StageRecord) -> None:
    """Record in an output directory which key produced it, and the stage's record (see `reuse`)."""
    payload = {"key": record.key, "record": record.model_dump(mode="json", exclude={"reused", "seconds"})}
    write_json(payload, directory / STAGE_RECORD)


@functools.cache
def code_version() -> str:
    """The package version and a hash of every source file it ships; part of every cache key.

    The hash reads the files themselves, so an edit changes it whether or not it is
    committed, and a deployed copy without git history (a Docker image) changes it too.
    """
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(file for package in PACKAGES for file in (root / package).rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    try:
        release = version("recflow")
    except PackageNotFoundError:
        release = "unreleased"
    return f"{release}+{digest.hexdigest()[:12]}"


def publish_dir(staged: Path, target: Path) -> Path:
    """Move a fully written directory into place, replacing any previous version.

    The old version is renamed aside first and removed only after the new one is in
    place, so at every moment `target` is either the old or the new directory. `staged`
    must lie in workspace/.tmp (see `temp_dir`).
    """
    for file in staged.rglob("*"):
        if file.is_file():
            _fsync(file)
    target.parent.mkdir(parents=True, exist_ok=True)
    retired = None
    if target.exists():  # set aside in .tmp/, where readers never look and the next run cleans up
        retired = staged.parent / f"retired-{target.name}-{uuid.uuid4().hex[:8]}"
        os.rename(target, retired)
    os.rename(staged, target)
    _fsync_dir(target.parent)
    if retired is not None:
        shutil.rmtree(retired, ignore_errors=True)
    return target


def write_parquet(frame: pl.DataFrame, path: Path) -> Path:
    return _atomic(path, lambda tmp: frame.write_parquet(tmp, compression="zstd", statistics=True))


def write_parquet_blocks(frames: Iterable[pl.DataFrame], schema: pl.Schema, path: Path) -> Path:
    """Write `frames` (each of `schema`), in order, as one parquet file, holding about
    ROW_GROUP rows at a time (a row group each) instead of the whole table."""
    import pyarrow.parquet as pq

    def write(tmp: Path) -> None:
        with pq.ParquetWriter(tmp, pl.DataFrame(schema=schema).to_arrow().schema, compression="zstd") as writer:
            pending: list[pl.DataFrame] = []
            for frame in frames:
                pending.append(frame)
                if sum(part.height for part in pending) >= ROW_GROUP:
                    writer.write_table(pl.concat(pending).to_arrow())
                    pending = []
            if pending:
                writer.write_table(pl.concat(pending).to_arrow())

    return _atomic(path, write)


def write_json(payload: object, path: Path) -> Path:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str)
    return _atomic(path, lambda tmp: tmp.write_text(text))


def _atomic(path: Path, write) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        _fsync(tmp)
        os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return path


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def published_list(workspace: Path, user_id: str, run_date: dt.date | None = None) -> pl.DataFrame:
    """One user's published list (latest run date unless given), with item titles and the
    title of the history item that explains each recommendation."""
    root = workspace / "recommendations"
    dates = sorted(path.name.removeprefix("run_date=") for path in root.glob("run_date=*"))
    if not dates:
        raise RecflowError(f"no recommendations under {root}; run `recflow run` first, or give the workspace that "
                           "holds them with --workspace")
    day = run_date.isoformat() if run_date else dates[-1]
    if day not in dates:
        raise RecflowError(f"no recommendations for run date {day} under {root} (latest: {dates[-1]})")
    table = pl.read_parquet(root / f"run_date={day}" / "*.parquet").filter(pl.col("user_id") == user_id)
    if table.is_empty():
        raise RecflowError(f"user {user_id!r} has no list on {day}: not in that run's input")
    items = partition(workspace, "snapshots", dt.date.fromisoformat(day)) / "items.parquet"
    titles = (pl.read_parquet(items, columns=["item_id", "title"]) if items.exists()
              else pl.DataFrame(schema={"item_id": pl.String, "title": pl.String}))
    table = table.join(titles, on="item_id", how="left").join(
        titles.rename({"item_id": "because_item_id", "title": "because_title"}), on="because_item_id", how="left"
    )
    return table.sort("rank").select("rank", "item_id", "title", "score", "reason", "because_item_id",
                                     "because_title", "run_date", "model_version")
