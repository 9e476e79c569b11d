"""The workspace: where every run writes, and the one writer of published files.

Everything a run publishes goes through `publish_dir` or `write_parquet`/`write_json`:
written under a temp name, fsynced, then renamed into place, so a reader sees a file or
partition whole or not at all.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import uuid
from pathlib import Path

import polars as pl


class RecflowError(Exception):
    """An error the user can cause and fix (bad input, path, date or config).

    The CLI prints it as one line and exits non-zero, without a traceback.
    """


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


def publish_dir(staged: Path, target: Path) -> Path:
    """Move a fully written directory into place, replacing any previous version.

    The old version is renamed aside first and removed only after the new one is in
    place, so at every moment `target` is either the old or the new directory.
    """
    for file in staged.rglob("*"):
        if file.is_file():
            _fsync(file)
    target.parent.mkdir(parents=True, exist_ok=True)
    retired = None
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
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
