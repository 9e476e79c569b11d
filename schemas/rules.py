"""Rules, each written once: what every interaction row must satisfy, and what the business
allows a list to show.

Row rules: two things are built from this table, so they can never disagree: the Great
Expectations suite of the validation gate (schemas/suites.py, one expectation per rule) and
ingestion's bad-row filter (with `validation.max_bad_row_fraction` above 0, rows that break a
rule are quarantined with the rule's reason instead of failing the run).

Business rules (docs/lists.md, "Business rules"): which items are servable and which
exclusions hold on a run date. The features stage evaluates them once per night; every list
is then drawn through tasks/lists.py, which applies them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import polars as pl

from schemas.config import ValidationConfig
from schemas.tables import AVAILABILITY

Check = Literal["not_null", "not_blank", "between", "in_items"]


@dataclass(frozen=True)
class RowRule:
    """One rule on one column. `between` bounds are inclusive; a null value breaks only
    `not_null`."""

    column: str
    check: Check
    reason: str  # what a quarantined row's `reason` column says
    low: float | None = None
    high: float | None = None

    def broken(self, item_ids: pl.Series | None = None) -> pl.Expr:
        """A polars expression, true for the rows that break the rule (`item_ids`: the
        items table's ids, for `in_items`)."""
        value = pl.col(self.column)
        if self.check == "not_null":
            return value.is_null()
        if self.check == "not_blank":
            return (value.str.strip_chars() == "").fill_null(False)
        if self.check == "between":
            low = value >= self.low if self.low is not None else pl.lit(True)
            high = value <= self.high if self.high is not None else pl.lit(True)
            return (~(low & high)).fill_null(False)
        return (~value.is_in(item_ids.implode())).fill_null(False)


def end_of_day(day: dt.date) -> int:
    """The last unix second of `day` (UTC): no event of a run may be later."""
    return int(dt.datetime.combine(day + dt.timedelta(days=1), dt.time(), dt.timezone.utc).timestamp()) - 1


def row_rules(cfg: ValidationConfig, run_date: dt.date, has_items: bool) -> list[RowRule]:
    """The row rules of a run on `run_date`; the items rule only when there is an items table."""
    rules = [
        RowRule("user_id", "not_null", "empty user_id"),
        RowRule("item_id", "not_null", "empty item_id"),
        RowRule("timestamp", "not_null", "missing timestamp"),
        RowRule("user_id", "not_blank", "empty user_id"),
        RowRule("item_id", "not_blank", "empty item_id"),
        RowRule("timestamp", "between", "timestamp before 1970 or after the run date", 0, end_of_day(run_date)),
        RowRule("rating", "between", f"rating outside [{cfg.rating_min}, {cfg.rating_max}]", cfg.rating_min,
                cfg.rating_max),
    ]
    if has_items:
        rules.append(RowRule("item_id", "in_items", "item not in the items table"))
    return rules


def serving_moment(run_date: dt.date) -> int:
    """The moment a run's lists start being served: the end of its run date (unix seconds,
    UTC). The business rules are evaluated at this moment."""
    return end_of_day(run_date) + 1


def servable(moment: int) -> pl.Expr:
    """True for the items of an items table (AVAILABILITY columns, each optional and null =
    no limit) that may be shown at `moment`: available, and available_from <= moment <
    available_until."""
    return (pl.col("available").fill_null(True)
            & (pl.col("available_from").fill_null(moment) <= moment)
            & (pl.col("available_until").is_null() | (moment < pl.col("available_until"))))


def in_force(moment: int) -> pl.Expr:
    """True for the rows of an exclusions table that hold at `moment` (null `until`: for good)."""
    return pl.col("until").is_null() | (moment < pl.col("until"))


def servable_catalogue(catalogue: pl.DataFrame, exclusions: pl.DataFrame | None, moment: int) -> pl.DataFrame:
    """(item_id, servable) for every item of `catalogue` (an items table, its AVAILABILITY
    columns optional): servable at `moment` by its availability, and not excluded for everyone
    by an exclusion in force then (a null user_id)."""
    missing = [pl.lit(None, dtype).alias(name) for name, dtype in AVAILABILITY.items() if name not in catalogue.columns]
    flags = catalogue.with_columns(missing).select("item_id", servable(moment).alias("servable"))
    if exclusions is not None:
        everyone = exclusions.filter(in_force(moment) & pl.col("user_id").is_null())["item_id"].implode()
        flags = flags.with_columns(pl.col("servable") & ~pl.col("item_id").is_in(everyone))
    return flags
