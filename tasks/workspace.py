"""The workspace: where every run writes, and the one writer of published files.

Everything a run publishes goes through `publish_dir` or `write_parquet`/`write_json`:
written under a temp name, fsynced, then renamed into place, so a reader sees a file or
partition whole or not at all.

Stage outputs are cached by content: a stage stamps its output directory with the hash
of everything the output was computed from (`stage_key`: the input's key, the config, the
code version), and a later run whose key matches `reuse`s the output instead of
recomputing it.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import TypeVar

import polars as pl
from pydantic import BaseModel

Record = TypeVar("Record", bound=BaseModel)
STAGE_RECORD = "_stage.json"


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


def partition(workspace: Path, table: str, run_date: dt.date) -> Path:
    return workspace / table / f"run_date={run_date.isoformat()}"


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
    """The record a stage left in `path` when it was computed from `key`; None otherwise."""
    try:
        stored = json.loads((path / STAGE_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record_type.model_validate(stored["record"]) if stored.get("key") == key else None


def stamp(directory: Path, key: str, record: BaseModel) -> None:
    """Record in an output directory which key produced it (see `reuse`)."""
    write_json({"key": key, "record": record.model_dump(mode="json")}, directory / STAGE_RECORD)


@functools.cache
def code_version() -> str:
    """Package version plus git commit when run from a checkout; part of every cache key."""
    from importlib.metadata import version

    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version('recflow')}+{sha}" if sha else version("recflow")


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
