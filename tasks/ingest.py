"""Ingestion: turn a source into the run's snapshot of normalised input tables.

First stage of the nightly DAG. It reads one of four sources (a directory in the generic
layout, a MovieLens directory, a GroupLens archive fetched into a cache, or the seeded
synthetic generator), maps it onto the input contract (docs/design.md: string ids,
unix-second timestamps) and stages parquet files under workspace/.tmp. Validation decides
whether the staged snapshot is published to snapshots/run_date=.../ or quarantined.

A run sees only interactions up to the end of its run date, so a backfill of a past date
never uses later events. Timestamps later than the wall clock are not dropped but left for
validation to reject: they are an error in the input, not tomorrow's data.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import polars as pl

from schemas.config import Run, SyntheticConfig, ValidationConfig
from schemas.rules import end_of_day, row_rules
from schemas.tables import AVAILABILITY, EXCLUSIONS, INTERACTIONS, INTERACTIONS_REQUIRED, ITEMS, Snapshot
from tasks import privacy
from tasks.stage import stage
from tasks.workspace import RecflowError, code_version, reuse, stage_key, temp_dir, write_parquet

log = logging.getLogger(__name__)

MOVIELENS_URL = "https://files.grouplens.org/datasets/movielens"
MOVIELENS_ARCHIVES = ("ml-latest-small", "ml-latest", "ml-20m", "ml-25m", "ml-32m")


def ingest(run: Run) -> Snapshot:
    """Read the run's source, normalise it and stage it as parquet; return the staged
    snapshot (or the published one, when an earlier run of this date validated the same
    input under the same settings and code).

    Before anything is written, users on `privacy.deleted_users` lose all their events and,
    with `privacy.key_file`, user ids become pseudonyms (tasks/privacy.py). With
    `validation.max_bad_row_fraction` above zero, rows that break a row rule
    (schemas/rules.py) are staged apart (`Snapshot.rejected`, with a reason each) for
    validation to quarantine.
    """
    cfg = run.config
    key = stage_key(
        "snapshot", fingerprint(cfg.source, run.run_date, cfg.synthetic, cfg.seed), cfg.validation,
        privacy.fingerprint(cfg.privacy, run.workspace), code_version(),
    )
    if (found := reuse(run.partition("snapshots"), key, Snapshot)) is not None:
        return found
    lenient = cfg.validation.max_bad_row_fraction > 0
    if cfg.source == "synthetic":
        interactions, items = generate_synthetic(cfg.synthetic, run.run_date, cfg.seed)
        exclusions = synthetic_exclusions(cfg.synthetic, run.run_date, cfg.seed, interactions)
        users, origin = None, {"interactions": "synthetic", "items": "synthetic", "exclusions": "synthetic"}
    else:
        directory = _directory(cfg.source)
        interactions, items, users = read_directory(directory, lenient)
        exclusions = read_exclusions(directory)
        origin = {table: str(path) for table, path in source_files(directory).items()}
    interactions = up_to(interactions, run.run_date)
    deleted, secret = privacy.deleted_users(cfg.privacy, run.workspace), privacy.read_key(cfg.privacy, run.workspace)
    if secret and users is not None:  # other user columns may identify a person (email, name): not kept
        users = users.select("user_id")
    before = interactions.height
    interactions, users = privacy.protect(interactions, deleted, secret), privacy.protect(users, deleted, secret)
    exclusions = privacy.protect(exclusions, deleted, secret)
    if deleted.len():
        log.info("privacy: %d user(s) on the deletion list; %d of their event(s) dropped", deleted.len(),
                 before - interactions.height)
    if secret:
        log.info("privacy: user ids pseudonymised with the key in privacy.key_file")
    staged = temp_dir(run.workspace, "snapshot")
    snapshot = Snapshot(key=key, path=staged, source=cfg.source, n_interactions=0, n_users=0, n_items=0,
                        has_items=items is not None, data_hash="", origin=origin,
                        pseudonym_key=privacy.fingerprint(cfg.privacy, run.workspace)["key"])
    if lenient:
        interactions, rejected = quarantine_rows(interactions, items, cfg.validation, run.run_date,
                                                 origin["interactions"])
        if rejected.height:
            write_parquet(rejected, snapshot.rejected)
    write_parquet(interactions, snapshot.interactions)
    if items is not None:
        write_parquet(items, snapshot.items)
    if users is not None:
        write_parquet(users, staged / "users.parquet")
    if exclusions is not None:
        write_parquet(exclusions, snapshot.exclusions)
    snapshot = snapshot.model_copy(update={
        "n_interactions": interactions.height,
        "n_users": interactions["user_id"].n_unique(),
        "n_items": interactions["item_id"].n_unique(),
        "data_hash": _hash_files(sorted(staged.glob("*.parquet"))),
    })
    log.info(
        "ingested %s: %d interactions, %d users, %d items",
        cfg.source, snapshot.n_interactions, snapshot.n_users, snapshot.n_items,
    )
    return snapshot


def fingerprint(source: str, run_date: dt.date, synthetic: SyntheticConfig, seed: int) -> str:
    """A hash of the raw input a run on `run_date` would read: its cache key, computed
    without parsing anything."""
    if source == "synthetic":
        return stage_key("synthetic", synthetic, seed, run_date)
    directory = _directory(source)
    if not directory.is_dir():
        raise RecflowError(f"source {source!r} is not a directory, 'synthetic' or 'movielens:<name>'")
    return stage_key(_hash_files(sorted(source_files(directory).values())), run_date)


def quarantine_rows(
    interactions: pl.DataFrame, items: pl.DataFrame | None, cfg: ValidationConfig, run_date: dt.date, path: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split off the rows that cannot be parsed or break a row rule (schemas/rules.py), each
    with its reason; fail when they are more than `cfg.max_bad_row_fraction` of the table."""
    rules = row_rules(cfg, run_date, items is not None)
    item_ids = items["item_id"] if items is not None else None
    reasons = [pl.when(pl.col("problem").is_not_null()).then(pl.col("problem"))]
    reasons += [pl.when(rule.broken(item_ids)).then(pl.lit(rule.reason)) for rule in rules]
    tagged = interactions.with_columns(pl.coalesce(reasons).alias("reason")).drop("problem")
    rejected = tagged.filter(pl.col("reason").is_not_null())
    share = rejected.height / max(tagged.height, 1)
    if share > cfg.max_bad_row_fraction:
        counts = rejected.group_by("reason").len().sort("len", descending=True).head(3).rows()
        raise RecflowError(
            f"{path}: {rejected.height} of {tagged.height} rows ({share:.1%}) are bad, more than "
            f"max_bad_row_fraction {cfg.max_bad_row_fraction:.1%} allows: "
            + "; ".join(f"{count} x {text}" for text, count in counts)
        )
    if rejected.height:
        log.warning("%s: %d bad row(s) quarantined (%.2f%%)", path, rejected.height, 100 * share)
    return tagged.filter(pl.col("reason").is_null()).drop("reason"), rejected


def up_to(interactions: pl.DataFrame, run_date: dt.date) -> pl.DataFrame:
    """Drop events after the run date (a backfill's future); keep those after now for
    validation to reject."""
    cutoff = end_of_day(run_date)
    now = int(time.time())
    later = (pl.col("timestamp") > cutoff) & (pl.col("timestamp") <= now)
    dropped = interactions.select(later.sum()).item()
    if dropped:
        log.info("ingest: %d interactions after %s left out (the run sees only its date and before)", dropped, run_date)
    return interactions.filter(~later | pl.col("timestamp").is_null())


# --- directories ---------------------------------------------------------------------


def _directory(source: str) -> Path:
    return fetch_movielens(source.split(":", 1)[1]) if source.startswith("movielens:") else Path(source)


def read_directory(
    directory: Path, lenient: bool = False
) -> tuple[pl.DataFrame, pl.DataFrame | None, pl.DataFrame | None]:
    """Read a generic-layout or MovieLens directory into normalised frames (see
    `normalise_interactions` for `lenient`)."""
    if not directory.is_dir():
        raise RecflowError(f"source {str(directory)!r} is not a directory, 'synthetic' or 'movielens:<name>'")
    if (directory / "ratings.csv").exists() and _find(directory, "interactions") is None:
        return _read_movielens(directory, lenient)
    path = _find(directory, "interactions")
    if path is None:
        raise RecflowError(f"{directory}: no interactions.csv or interactions.parquet (nor MovieLens ratings.csv)")
    interactions = normalise_interactions(_read_table(path), path, lenient)
    items_path = _find(directory, "items")
    items = normalise_items(_read_table(items_path), items_path) if items_path else None
    users_path = _find(directory, "users")
    users = _read_table(users_path) if users_path else None
    if users is not None:
        _require(users, ("user_id",), users_path)
        users = users.with_columns(pl.col("user_id").cast(pl.String))
    return interactions, items, users


def source_files(directory: Path) -> dict[str, Path]:
    """The file each input table of `directory` is read from."""
    if (directory / "ratings.csv").exists() and _find(directory, "interactions") is None:
        movielens = {"interactions": directory / "ratings.csv", "items": directory / "movies.csv"}
        return movielens | ({"exclusions": path} if (path := _find(directory, "exclusions")) else {})
    tables = ("interactions", "items", "users", "exclusions")
    return {table: path for table in tables if (path := _find(directory, table))}


def _read_movielens(directory: Path, lenient: bool):
    ratings_path = directory / "ratings.csv"
    ratings = _read_table(ratings_path)
    _require(ratings, ("userId", "movieId", "timestamp"), ratings_path)
    interactions = normalise_interactions(
        ratings.rename({"userId": "user_id", "movieId": "item_id"}), ratings_path, lenient
    )
    items = None
    movies_path = directory / "movies.csv"
    if movies_path.exists():
        movies = _read_table(movies_path)
        _require(movies, ("movieId",), movies_path)
        movies = movies.rename({"movieId": "item_id", "genres": "categories"}, strict=False)
        if "categories" in movies.columns:
            movies = movies.with_columns(
                pl.when(pl.col("categories") == "(no genres listed)")
                .then(None)
                .otherwise(pl.col("categories"))
                .alias("categories")
            )
        items = normalise_items(movies, movies_path)
    return interactions, items, None


def _find(directory: Path, stem: str) -> Path | None:
    """The file holding table `stem` (`.parquet` or `.csv`); two of them is an error, never a
    silent choice (a stale export beside a fresh one)."""
    found = [directory / f"{stem}{suffix}" for suffix in (".parquet", ".csv") if (directory / f"{stem}{suffix}").exists()]
    if len(found) > 1:
        raise RecflowError(f"{directory}: both {found[0].name} and {found[1].name} hold the {stem} table; "
                           "remove the one that is not tonight's export")
    return found[0] if found else None


def _read_table(path: Path) -> pl.DataFrame:
    try:
        if path.suffix == ".parquet":
            return pl.read_parquet(path)
        # Everything as text first: ids stay exactly as written ("007" stays "007").
        return pl.read_csv(path, infer_schema=False, encoding="utf8")
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecflowError(f"{path}: cannot be read as {path.suffix[1:]}: {first_line}") from error


def _require(frame: pl.DataFrame, columns, path: Path) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        hint = ""
        if len(frame.columns) == 1 and (separator := next((c for c in ";\t|" if c in frame.columns[0]), None)):
            hint = f" (the header looks {separator!r}-separated; recflow reads comma-separated CSV)"
        raise RecflowError(
            f"{path}: missing required column(s) {', '.join(missing)}; found {', '.join(frame.columns) or 'none'}{hint}"
        )


# --- normalisation -------------------------------------------------------------------


def normalise_interactions(frame: pl.DataFrame, path: Path, lenient: bool = False) -> pl.DataFrame:
    """Map raw interactions onto the INTERACTIONS schema; unparseable values are errors.

    `lenient` instead keeps such rows, with what is wrong in an extra `problem` column, for
    `quarantine_rows`. Columns the contract does not know are reported and left out.
    """
    _require(frame, INTERACTIONS_REQUIRED, path)
    extra = [column for column in frame.columns if column not in INTERACTIONS.names()]
    if extra:
        log.warning("%s: column(s) %s are not part of the input contract and are not used", path, ", ".join(extra))
    columns = [
        pl.col("user_id").cast(pl.String),
        pl.col("item_id").cast(pl.String),
        _timestamp_seconds(frame["timestamp"]).alias("timestamp"),
    ]
    for name in ("rating", "weight"):
        columns.append(pl.col(name).cast(pl.Float64, strict=False) if name in frame.columns else pl.lit(None, pl.Float64).alias(name))
    columns.append(pl.col("event_type").cast(pl.String) if "event_type" in frame.columns else pl.lit(None, pl.String).alias("event_type"))
    normalised = frame.select(columns).select(INTERACTIONS.names())
    problem = pl.lit(None, pl.String)
    for name in ("weight", "rating", "timestamp"):  # the first problem of a row wins
        if name in frame.columns:
            if not lenient:
                _reject_unparsed(frame[name], normalised[name], name, path)
            unparsed = _unparsed(frame[name], normalised[name])
            problem = pl.when(unparsed).then(pl.format(f"{name} {{}} cannot be parsed", frame[name].cast(pl.String))).otherwise(problem)
    return normalised.with_columns(problem.alias("problem")) if lenient else normalised


def _timestamp_seconds(raw: pl.Series) -> pl.Series:
    if raw.dtype.is_numeric():
        return raw.cast(pl.Float64).floor().cast(pl.Int64)
    if raw.dtype == pl.Datetime or raw.dtype == pl.Date:
        return raw.cast(pl.Datetime("us")).dt.epoch("s")
    text = raw.cast(pl.String).str.strip_chars().str.replace(" ", "T")
    numeric = text.cast(pl.Float64, strict=False).floor().cast(pl.Int64)
    zoned = text.str.strptime(pl.Datetime("us", "UTC"), "%Y-%m-%dT%H:%M:%S%.f%#z", strict=False)
    naive = text.str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S%.f", strict=False).dt.replace_time_zone("UTC")
    day = text.str.strptime(pl.Date, "%Y-%m-%d", strict=False).cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    parsed = pl.select(pl.coalesce(zoned, naive, day).dt.epoch("s")).to_series()
    return pl.select(pl.coalesce(numeric, parsed)).to_series()


def _unparsed(raw: pl.Series, parsed: pl.Series) -> pl.Series:
    return raw.is_not_null() & (raw.cast(pl.String).str.strip_chars() != "") & parsed.is_null()


def _reject_unparsed(raw: pl.Series, parsed: pl.Series, name: str, path: Path) -> None:
    bad = _unparsed(raw, parsed).arg_true()
    if bad.len():
        sample = ", ".join(f"row {i + 2}: {raw[i]!r}" for i in bad.head(3).to_list())
        raise RecflowError(f"{path}: column {name!r} has {bad.len()} value(s) that cannot be parsed ({sample})")


def normalise_items(frame: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Map a raw items table onto the ITEMS schema; extra columns are kept as item features."""
    _require(frame, ("item_id",), path)
    title = pl.col("title").cast(pl.String) if "title" in frame.columns else pl.lit(None, pl.String).alias("title")
    if "categories" not in frame.columns:
        categories = pl.lit(None, pl.List(pl.String)).alias("categories")
    elif frame.schema["categories"] == pl.List(pl.String):
        categories = pl.col("categories")
    else:
        categories = pl.col("categories").cast(pl.String).str.split("|").list.eval(
            pl.element().str.strip_chars().filter(pl.element() != "")
        )
    extra = [c for c in frame.columns if c not in ("item_id", "title", "categories", *AVAILABILITY.names())]
    availability = _availability(frame, path)
    return frame.select(pl.col("item_id").cast(pl.String), title, categories, *extra).cast(dict(ITEMS)).with_columns(
        availability)


def _availability(frame: pl.DataFrame, path: Path) -> list[pl.Series]:
    """The items table's availability columns, parsed (AVAILABILITY): `available` as a bool
    (true/false, 1/0, yes/no), the window's ends as unix seconds; empty = no limit. A value
    that cannot be parsed, or a window that ends before it starts, fails naming the row."""
    parsed = []
    if "available" in frame.columns:
        raw = frame["available"]
        flag = raw if raw.dtype == pl.Boolean else raw.cast(pl.String).str.strip_chars().str.to_lowercase().replace_strict(
            {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": None},
            default=None, return_dtype=pl.Boolean)
        _reject_unparsed(raw, flag, "available", path)
        parsed.append(flag.alias("available"))
    for name in ("available_from", "available_until"):
        if name in frame.columns:
            seconds = _timestamp_seconds(frame[name])
            _reject_unparsed(frame[name], seconds, name, path)
            parsed.append(seconds.alias(name))
    if {"available_from", "available_until"} <= set(frame.columns):
        start, end = parsed[-2], parsed[-1]
        backwards = (start > end).fill_null(False).arg_true()
        if backwards.len():
            row = backwards[0]
            raise RecflowError(
                f"{path}: column 'available_until' is before 'available_from' in {backwards.len()} row(s) "
                f"(row {row + 2}: item {frame['item_id'][row]!r}, from {frame['available_from'][row]!r} "
                f"until {frame['available_until'][row]!r})"
            )
    return parsed


def read_exclusions(directory: Path) -> pl.DataFrame | None:
    """The directory's exclusions table (EXCLUSIONS), if it has one: `user_id` (empty = every
    user), `item_id`, optional `until` (unix seconds or ISO-8601; empty = for good)."""
    path = _find(directory, "exclusions")
    if path is None:
        return None
    frame = _read_table(path)
    _require(frame, ("user_id", "item_id"), path)
    unknown = [column for column in frame.columns if column not in EXCLUSIONS.names()]
    if unknown:
        raise RecflowError(f"{path}: unknown column(s) {', '.join(unknown)}; an exclusions table has user_id, "
                           "item_id and, optionally, until")
    until = _timestamp_seconds(frame["until"]) if "until" in frame.columns else pl.Series("until", [None] * frame.height,
                                                                                          pl.Int64)
    if "until" in frame.columns:
        _reject_unparsed(frame["until"], until, "until", path)
    user = pl.col("user_id").cast(pl.String).str.strip_chars()
    return frame.select(
        pl.when(user == "").then(None).otherwise(pl.col("user_id").cast(pl.String)).alias("user_id"),
        pl.col("item_id").cast(pl.String),
        until.alias("until"),
    ).cast(dict(EXCLUSIONS))


# --- GroupLens archives --------------------------------------------------------------


def fetch_movielens(name: str, attempts: int = 4) -> Path:
    """Return the cached directory of GroupLens archive `name`, downloading it once.

    The archive is verified against the MD5 file GroupLens publishes beside it. The base
    URL is RECFLOW_MOVIELENS_URL (default: GroupLens), the cache RECFLOW_CACHE.
    """
    if name not in MOVIELENS_ARCHIVES:
        raise RecflowError(f"unknown MovieLens archive {name!r}; choose one of {', '.join(MOVIELENS_ARCHIVES)}")
    cache = Path(os.environ.get("RECFLOW_CACHE", Path.home() / ".cache" / "recflow")).expanduser()
    target = cache / name
    if (target / "ratings.csv").exists():
        return target
    base = os.environ.get("RECFLOW_MOVIELENS_URL", MOVIELENS_URL).rstrip("/")
    archive = _download(f"{base}/{name}.zip", attempts)
    checksum = re.search(r"\b[0-9a-f]{32}\b", _download(f"{base}/{name}.zip.md5", attempts).decode("ascii", "replace"))
    if checksum is None or hashlib.md5(archive).hexdigest() != checksum.group(0):
        raise RecflowError(f"{base}/{name}.zip: checksum does not match {name}.zip.md5; the download is corrupt")
    staging = cache / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(io.BytesIO(archive)) as bundle:
        for member in bundle.namelist():
            if member.endswith(".csv") or member.endswith(".txt"):
                (staging / Path(member).name).parent.mkdir(parents=True, exist_ok=True)
                (staging / Path(member).name).write_bytes(bundle.read(member))
    shutil.rmtree(target, ignore_errors=True)
    os.rename(staging, target)
    log.info("downloaded %s into %s", name, target)
    return target


def _download(url: str, attempts: int) -> bytes:
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            if error.code < 500 or attempt == attempts:
                raise RecflowError(f"{url}: HTTP {error.code} {error.reason}") from error
        except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
            if attempt == attempts:
                raise RecflowError(f"{url}: cannot download ({error})") from error
        time.sleep(0.5 * 2**attempt)
        log.warning("retrying %s (attempt %d of %d)", url, attempt + 1, attempts)
    raise AssertionError("unreachable")


def _hash_files(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


# --- synthetic -----------------------------------------------------------------------


SYNTHETIC_CHUNK = 25_000


def generate_synthetic(cfg: SyntheticConfig, run_date: dt.date, seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A seeded dataset with planted structure a good recommender should find, that grows
    day by day.

    Users and items belong to latent clusters; popularity within a cluster follows a power
    law; each cluster's items form a chain that users walk forward in time-ordered sessions
    (the sequential signal); item categories and title words are drawn from their cluster's.
    This world is the seed's. Time runs in epochs of `days` days from 1970: in each, every
    user walks once, drawn from (seed, epoch). A date sees the `days` days before it, the end
    of the last epoch and the start of the current one, so the next date sees one more day
    of events (users mid-walk go on, users whose walk starts are new) and loses its oldest;
    each date's data is the same on every machine.
    """
    rng = np.random.default_rng(seed)
    n_users, n_items, n_clusters = cfg.n_users, cfg.n_items, min(cfg.n_clusters, cfg.n_items)
    item_cluster = rng.permutation(np.arange(n_items) % n_clusters)
    order = np.lexsort((rng.random(n_items), item_cluster))  # items grouped by cluster, shuffled within
    sizes = np.bincount(item_cluster, minlength=n_clusters)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    segment = np.repeat(np.arange(n_clusters), sizes)
    rank = np.empty(n_items, dtype=np.int64)  # popularity rank, independent of chain order
    rank[np.lexsort((rng.random(n_items), segment))] = np.arange(n_items) - np.repeat(starts, sizes)
    weight = 1.0 / (1.0 + rank) ** 1.1
    cumulative = np.cumsum(weight)
    segment_low = np.concatenate([[0.0], cumulative[np.cumsum(sizes)[:-1] - 1]])
    segment_high = cumulative[np.cumsum(sizes) - 1]

    def popular(clusters: np.ndarray, uniform: np.ndarray) -> np.ndarray:
        """The item (a position in `order`) that each draw in [0, 1) picks from its cluster, by popularity."""
        draw = segment_low[clusters] + uniform * (segment_high[clusters] - segment_low[clusters])
        return np.minimum(np.searchsorted(cumulative, draw, side="right"), n_items - 1)

    user_cluster = rng.integers(n_clusters, size=n_users)
    second_cluster = rng.integers(n_clusters, size=n_users)
    lengths = np.clip(rng.lognormal(np.log(cfg.events_per_user) - 0.3, 0.8, n_users), 5, cfg.events_per_user * 8)
    lengths = lengths.astype(int)
    midnight = dt.datetime.combine(run_date, dt.time(), dt.timezone.utc).timestamp()
    end = midnight - 3600  # the last hour before the date stays empty
    window = cfg.days * 86400
    epoch = int(end // window)

    def walk(chunk: slice, start: float, rng: np.random.Generator, again: np.random.Generator) -> pl.DataFrame:
        """The sessions of users in `chunk` in the epoch from `start`, as (users x steps)
        arrays, then one row per event; with `cfg.repeat_share`, steps drawn from `again` go
        back to an item of the walk's earlier steps (else each item counts once)."""
        cluster, second, length = user_cluster[chunk], second_cluster[chunk], lengths[chunk]
        n, steps = length.size, int(length.max())
        position = np.zeros((n, steps), dtype=np.int64)  # index into `order` (0 past a walk's end)
        position[:, 0] = popular(cluster, rng.random(n))
        longest_first, shortest_first = np.argsort(-length, kind="stable"), np.sort(length)
        for t in range(1, steps):
            # Each step draws for every user (the walks stay the seed's), but only the walks
            # still going compute their step: most end long before the longest.
            rows = longest_first[: n - np.searchsorted(shortest_first, t, side="right")]
            previous = position[rows, t - 1]
            move, hop = rng.random(n)[rows], rng.integers(1, 3, n)[rows]
            home = np.where(rng.random(n)[rows] < 0.8, cluster[rows], second[rows])
            near, anywhere = rng.random(n)[rows], rng.integers(n_clusters, size=n)[rows]
            far = rng.random(n)[rows]
            of_previous = segment[previous]
            step = starts[of_previous] + (previous - starts[of_previous] + hop) % sizes[of_previous]
            jump, close = move >= 0.55, move < 0.9  # else the chain's next item
            step[jump] = popular(np.where(close, home, anywhere)[jump], np.where(close, near, far)[jump])
            position[rows, t] = step
        for t in range(1, steps if cfg.repeat_share > 0 else 1):
            back = again.random(n) < cfg.repeat_share
            position[back, t] = position[back, again.integers(0, t, n)[back]]
        valid = np.arange(steps)[None, :] < length[:, None]
        new_session = rng.random((n, steps)) < 0.12
        gap = np.where(new_session, rng.exponential(86400 * 3.0, (n, steps)), rng.integers(30, 900, (n, steps)))
        gap[:, 0] = 0
        elapsed = np.cumsum(gap * valid, axis=1)
        span = elapsed.max(axis=1)
        scale = np.minimum(1.0, window * 0.9 / np.maximum(span, 1))
        first = start + rng.random(n) * (window - span * scale)
        timestamps = (first[:, None] + elapsed * scale[:, None]).astype(np.int64)
        users_matrix = np.broadcast_to(np.arange(chunk.start, chunk.start + n)[:, None], (n, steps))
        item_index = order[position]
        in_cluster = item_cluster[item_index] == cluster[:, None]
        rating = np.clip(np.round(3.0 + 1.2 * in_cluster + rng.normal(0, 0.8, (n, steps))), 1, 5)
        return pl.DataFrame(
            {
                "user_id": users_matrix[valid],
                "item_id": item_index[valid],
                "timestamp": timestamps[valid],
                "rating": rating[valid].astype(np.float64),
            }
        ).unique(once, keep="first", maintain_order=True)

    # Both epochs the date's window overlaps, in chunks of users, so memory stays flat at any
    # size (one chunk up to 25,000 users).
    seen = pl.col("timestamp").is_between(midnight - window, end, closed="left")
    once = ["user_id", "item_id", "timestamp"] if cfg.repeat_share > 0 else ["user_id", "item_id"]
    walks = []
    for current in (epoch - 1, epoch):
        walker = np.random.default_rng([seed, current])
        walks += [walk(slice(low, min(low + SYNTHETIC_CHUNK, n_users)), current * window, walker,
                       np.random.default_rng([seed, current, low, 1_000_037])).filter(seen)
                  for low in range(0, n_users, SYNTHETIC_CHUNK)]
    interactions = (
        pl.concat(walks)
        .sort("user_id", "timestamp", maintain_order=True)
        .unique(once, keep="first", maintain_order=True)
    ).select(
        pl.format("user_{}", pl.col("user_id")).alias("user_id"),
        pl.format("item_{}", pl.col("item_id")).alias("item_id"),
        "timestamp",
        "rating",
        pl.lit("view").alias("event_type"),
        pl.lit(None, pl.Float64).alias("weight"),
    )
    items = _synthetic_items(rng, item_cluster, cfg.n_categories, n_clusters)
    return _synthetic_availability(interactions, items, cfg, int(midnight), seed)


def _synthetic_availability(
    interactions: pl.DataFrame, items: pl.DataFrame, cfg: SyntheticConfig, midnight: int, seed: int
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Availability windows relative to the run date: a seeded `discontinued_share` of the
    items ends a seeded day in the window's first half and has no events after that; an
    `upcoming_share` launches 2 to 31 days after the run date and has none yet."""
    rng = np.random.default_rng([seed, 1_000_003])  # its own stream: the walks stay the seed's
    draw, days_ago, days_ahead = rng.random(items.height), rng.integers(1, max(2, cfg.days // 2), items.height), \
        rng.integers(2, 32, items.height)
    discontinued = draw < cfg.discontinued_share
    upcoming = ~discontinued & (draw < cfg.discontinued_share + cfg.upcoming_share)
    items = items.with_columns(
        pl.Series("available_from", np.where(upcoming, midnight + days_ahead * 86400, 0)).replace(0, None),
        pl.Series("available_until", np.where(discontinued, midnight - days_ago * 86400, 0)).replace(0, None),
    )
    window = items.select("item_id", "available_from", "available_until")
    interactions = (
        interactions.join(window, on="item_id", how="left", maintain_order="left")
        .filter(pl.col("available_from").is_null() & (pl.col("available_until").is_null()
                                                      | (pl.col("timestamp") < pl.col("available_until"))))
        .drop("available_from", "available_until")
    )
    return interactions, items


def synthetic_exclusions(cfg: SyntheticConfig, run_date: dt.date, seed: int,
                         interactions: pl.DataFrame) -> pl.DataFrame | None:
    """The synthetic source's exclusions table: `cfg.exclusions` seeded (user, item) pairs,
    items drawn by popularity (the ones a list would hold), half of them until two days after
    the run date and half for good, and one seeded item excluded for everyone."""
    if cfg.exclusions == 0 or interactions.is_empty():
        return None
    rng = np.random.default_rng([seed, 1_000_033, run_date.toordinal()])
    users = interactions["user_id"].unique().sort()
    counts = interactions.group_by("item_id").len().sort("item_id")
    weights = counts["len"].to_numpy() / counts["len"].sum()
    midnight = int(dt.datetime.combine(run_date, dt.time(), dt.timezone.utc).timestamp())
    pairs = pl.DataFrame({
        "user_id": users.gather(rng.integers(users.len(), size=cfg.exclusions)),
        "item_id": counts["item_id"].gather(rng.choice(counts.height, size=cfg.exclusions, p=weights)),
        "until": np.where(np.arange(cfg.exclusions) % 2 == 0, midnight + 2 * 86400, 0),
    }).with_columns(pl.col("until").replace(0, None))
    everyone = pl.DataFrame({"user_id": [None], "item_id": [counts["item_id"][int(rng.integers(counts.height))]],
                             "until": [None]}, schema=dict(EXCLUSIONS))
    return pl.concat([pairs.cast(dict(EXCLUSIONS)), everyone]).unique(["user_id", "item_id"], maintain_order=True)


def _synthetic_items(rng: np.random.Generator, item_cluster: np.ndarray, n_categories: int, n_clusters: int) -> pl.DataFrame:
    n_items = item_cluster.size
    favourite = (np.arange(n_clusters)[:, None] * 2 + np.arange(2)[None, :]) % n_categories
    primary = favourite[item_cluster, rng.integers(2, size=n_items)]
    secondary = np.where(rng.random(n_items) < 0.7, favourite[item_cluster, 1 - (primary % 2)], rng.integers(n_categories, size=n_items))
    words = np.array(
        ["alpha", "bravo", "cosmic", "delta", "echo", "forest", "gamma", "harbor", "iron", "jade", "karma", "lunar",
         "metro", "nova", "orbit", "prism", "quartz", "river", "solar", "tango", "ultra", "vortex", "willow", "zenith"]
    )
    word = words[(item_cluster * 3 + rng.integers(3, size=n_items)) % words.size]
    return pl.DataFrame(
        {
            "item_id": [f"item_{i}" for i in range(n_items)],
            "title": [f"{w.title()} {i}" for i, w in enumerate(word)],
            "categories": [[f"cat_{a}", f"cat_{b}"] if a != b else [f"cat_{a}"] for a, b in zip(primary, secondary)],
        }
    )


ingest_task = stage(
    "ingest", ingest, retries=2, retry_delay_seconds=[5, 20],
    retry_condition_fn=lambda task, task_run, state: not isinstance(state.result(raise_on_failure=False), RecflowError),
)
