"""Great Expectations suites: what valid input looks like, built from the pipeline config.

The validation stage runs these against the staged snapshot; a failed expectation stops
the run before features. Row-level expectations come from the row rules
(schemas/rules.py), which ingestion's bad-row filter shares; the table-level ones
(columns, types, duplicates, sizes, volume) are here. The interactions table has two
suites: `interaction_rows_suite`, run on slices of the table, and `interactions_suite`,
run once on its ids and timestamps. Thresholds come from `ValidationConfig`.
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
    cfg: ValidationConfig, run_date: dt.date, item_ids: list[str] | None, previous: tuple[str, int] | None = None
) -> gx.ExpectationSuite:
    """What the whole interactions table is judged on at once, on its (user_id, item_id,
    timestamp) with the ids as categories: duplicates, sizes, the volume (`previous`: run
    date and interactions of the latest earlier snapshot) and, with an items table
    (`item_ids`), the row rule that every item is in it: GE then compares each distinct id
    once, where in slices it would carry a value set of every item id through each slice's
    bookkeeping (about 20 s per slice at 150,000 items). Every other row rule is in
    `interaction_rows_suite`."""
    expectations = [
        *(_expectation(rule, item_ids) for rule in row_rules(cfg, run_date, item_ids is not None)
          if rule.check == "in_items"),
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


def interaction_rows_suite(cfg: ValidationConfig, run_date: dt.date) -> gx.ExpectationSuite:
    """What each interaction row must satisfy: the required columns, string ids and the row
    rules (but the items-table one, in `interactions_suite`). Every row is judged on its own,
    so the table is validated in slices."""
    return gx.ExpectationSuite(name="interaction_rows", expectations=[
        *(gxe.ExpectColumnToExist(column=column) for column in INTERACTIONS_REQUIRED),
        *(_expectation(rule, None) for rule in row_rules(cfg, run_date, False)),
        gxe.ExpectColumnValuesToBeOfType(column="user_id", type_="str"),
        gxe.ExpectColumnValuesToBeOfType(column="item_id", type_="str"),
    ])


def drift_suites(cfg: ValidationConfig, earlier: str, frames: dict) -> dict[str, gx.ExpectationSuite]:
    """Tonight's input against the latest earlier snapshot (of run date `earlier`), beyond
    volume: the share of events from new users and of new items (`events`), the events-per-
    user distribution (`users`) and the category mix (`categories`, when both nights have
    item categories) as KL divergences from `earlier`'s (`frames["reference_*"]`, label ->
    count; every label of either night kept, with one extra count each so that a label
    only one night has is a finite surprise)."""
    shares = {"new_user": ("users", cfg.max_new_user_share), "new_item": ("items", cfg.max_new_item_share)}
    suites = {"events": gx.ExpectationSuite(name="drift_events", expectations=[
        gxe.ExpectColumnMeanToBeBetween(column=column, max_value=threshold, meta={
            "check": f"share of events {'from' if what == 'users' else 'on'} {what} {earlier} did not have, "
                     f"max_{column}_share is {threshold:g}"})
        for column, (what, threshold) in shares.items() if column in frames["events"].columns
    ])}
    for name, column, threshold, reads in (
        ("users", "bucket", cfg.max_events_per_user_kl, "events per user"),
        ("categories", "category", cfg.max_category_kl, "category mix of the events"),
    ):
        if name not in frames or threshold is None:
            continue
        reference = frames[f"reference_{name}"]
        labels = sorted(set(reference[column].to_list()) | set(frames[name][column].unique().to_list()))
        counts = dict(zip(reference[column].to_list(), reference["len"].to_list()))
        total = sum(counts.get(label, 0) + 1 for label in labels)
        suites[name] = gx.ExpectationSuite(name=f"drift_{name}", expectations=[gxe.ExpectColumnKLDivergenceToBeLessThan(
            column=column, threshold=threshold,
            partition_object={"values": labels, "weights": [(counts.get(label, 0) + 1) / total for label in labels]},
            meta={"check": f"{reads} against {earlier}'s (KL divergence)"},
        )])
    return suites


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
