"""Great Expectations suites: what valid input looks like, built from the pipeline config.

The validation stage runs these against the staged snapshot; a failed expectation stops
the run before features. Row-level expectations come from the row rules
(schemas/rules.py), which ingestion's bad-row filter shares; the table-level ones
(columns, types, duplicates, sizes, volume) are here. Thresholds come from
`ValidationConfig`.
"""

from __future__ import annotations

import datetime as dt
import math

import great_expectations as gx
import great_expectations.expectations as gxe

from schemas.config import ValidationConfig
from schemas.rules import RowRule, row_rules
from schemas.tables import INTERACTIONS_REQUIRED

NON_EMPTY = r"\S"


def interactions_suite(
    cfg: ValidationConfig, run_date: dt.date, item_ids: list[str] | None, previous: tuple[dt.date, int] | None = None
) -> gx.ExpectationSuite:
    """`item_ids` are the items table's ids (None: no items table); `previous` is (run date,
    interactions) of the latest earlier snapshot, for the volume check."""
    expectations = [
        *(gxe.ExpectColumnToExist(column=column) for column in INTERACTIONS_REQUIRED),
        *(_expectation(rule, item_ids) for rule in row_rules(cfg, run_date, item_ids is not None)),
        gxe.ExpectColumnValuesToBeOfType(column="user_id", type_="str"),
        gxe.ExpectColumnValuesToBeOfType(column="item_id", type_="str"),
        # GE counts every row of a duplicated group, so a rate r of extra copies is ~2r rows.
        gxe.ExpectCompoundColumnsToBeUnique(
            column_list=["user_id", "item_id", "timestamp"], mostly=max(0.0, 1 - 2 * cfg.max_duplicate_rate)
        ),
        gxe.ExpectTableRowCountToBeBetween(min_value=cfg.min_rows),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="user_id", min_value=cfg.min_users),
        gxe.ExpectColumnUniqueValueCountToBeBetween(column="item_id", min_value=cfg.min_items),
    ]
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


def catalogue_suite(run_date: dt.date) -> gx.ExpectationSuite:
    """Something may be shown tonight: at least one item of the catalogue is servable
    (`servable`, 0 or 1 per item, from schemas/rules.py)."""
    return gx.ExpectationSuite(name="catalogue", expectations=[gxe.ExpectColumnMaxToBeBetween(
        column="servable", min_value=1,
        meta={"check": f"no item is servable on {run_date} (available, inside its available_from/available_until "
                       "window and not excluded for everyone)"},
    )])


def exclusions_suite() -> gx.ExpectationSuite:
    """Each exclusion names an item (an empty user_id means every user)."""
    return gx.ExpectationSuite(
        name="exclusions",
        expectations=[
            gxe.ExpectColumnValuesToNotBeNull(column="item_id"),
            gxe.ExpectColumnValuesToMatchRegex(column="item_id", regex=NON_EMPTY),
            gxe.ExpectColumnValuesToBeBetween(column="until", min_value=0),
        ],
    )


def _expectation(rule: RowRule, item_ids: list[str] | None):
    if rule.check == "not_null":
        return gxe.ExpectColumnValuesToNotBeNull(column=rule.column)
    if rule.check == "not_blank":
        return gxe.ExpectColumnValuesToMatchRegex(column=rule.column, regex=NON_EMPTY)
    if rule.check == "between":
        return gxe.ExpectColumnValuesToBeBetween(column=rule.column, min_value=rule.low, max_value=rule.high)
    return gxe.ExpectColumnValuesToBeInSet(column=rule.column, value_set=item_ids)
