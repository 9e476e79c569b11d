"""Row rules: what every interaction row must satisfy, written once.

Two things are built from this table, so they can never disagree: the Great Expectations
suite of the validation gate (schemas/suites.py, one expectation per rule) and ingestion's
bad-row filter (with `validation.max_bad_row_fraction` above 0, rows that break a rule are
quarantined with the rule's reason instead of failing the run).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

import polars as pl

from schemas.config import ValidationConfig

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
