"""Great Expectations suites: what valid input looks like, built from the pipeline config.

The validation stage runs these against the staged snapshot; a failed expectation stops
the run before features. Thresholds come from `ValidationConfig`; the run date bounds
timestamps, and an items table, when given, bounds which items interactions may name.
"""

from __future__ import annotations

import datetime as dt
import math

import great_expectations as gx
import great_expectations.expectations as gxe

from schemas.config import ValidationConfig
from schemas.tables import INTERACTIONS_REQUIRED

NON_EMPTY = r"\S"


def interactions_suite(
    cfg: ValidationConfig, run_date: dt.date, item_ids: list[str] | None, previous: tuple[dt.date, int] | None = None
) -> gx.ExpectationSuite:
    """`previous` is (run date, interactions) of the latest earlier snapshot, for the volume check."""
    end_of_run_date = int(dt.datetime.combine(run_date + dt.timedelta(days=1), dt.time(), dt.timezone.utc).timestamp()) - 1
    expectations = [
        *(gxe.ExpectColumnToExist(column=column) for column in INTERACTIONS_REQUIRED),
        *(gxe.ExpectColumnValuesToNotBeNull(column=column) for column in INTERACTIONS_REQUIRED),
        gxe.ExpectColumnValuesToBeOfType(column="user_id", type_="str"),
        gxe.ExpectColumnValuesToBeOfType(column="item_id", type_="str"),
        gxe.ExpectColumnValuesToMatchRegex(column="user_id", regex=NON_EMPTY),
        gxe.ExpectColumnValuesToMatchRegex(column="item_id", regex=NON_EMPTY),
        gxe.ExpectColumnValuesToBeBetween(column="timestamp", min_value=0, max_value=end_of_run_date),
        gxe.ExpectColumnValuesToBeBetween(column="rating", min_value=cfg.rating_min, max_value=cfg.rating_max),
        # GE counts every row of a duplicated group, so a rate r of extra copies is ~2r rows.
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["user_id", "item_id", "timestamp"], mostly=max(0.0, 1 - 2 * cfg.max_duplicate_rate)
        ),
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="user_id", min_value=cfg.min_users),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="item_id", min_value=cfg.min_items),
    ]
    if item_ids is not None:
        expectations.append(gxe.ExpectColumnValuesToBeInSet(column="item_id", value_set=item_ids))
    if previous is not None:
        day, rows = previous
        expectations.append(gxe.ExpectTableRowCountToBeBetween(
            min_value=math.ceil((1 - cfg.max_volume_drop) * rows),
            meta={"check": f"volume drop: {day} had {rows} interactions, max_volume_drop is {cfg.max_volume_drop:g}"},
        ))
    return gx.ExpectationSuite(name="interactions", expectations=expectations)


def items_suite() -> gx.ExpectationSuite:
    return gx.ExpectationSuite(
        name="items",
        expectations=[
            gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
            gxe.ExpectColumnValuesToMatchRegex(column="item_id", regex=NON_EMPTY),
            gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        ],
    )
