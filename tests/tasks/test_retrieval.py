"""The two-tower model's training examples: windows of each history, a next-item target at
every place."""

from __future__ import annotations

import numpy as np
import polars as pl

from tasks.retrieval import training_examples


def test_windows_tile_each_history_so_every_event_but_a_users_first_is_one_places_target():
    events = pl.DataFrame({"user_idx": [1, 1, 1, 1, 1, 2, 3, 3], "item_idx": [5, 6, 7, 8, 9, 4, 2, 3]},
                          schema={"user_idx": pl.Int32, "item_idx": pl.Int32})
    examples = training_examples(events, length=2)
    # user 1 (5 6 7 8 9): windows ending at 7 and at 9, items newest first; user 2 has one event
    assert examples["user_idx"].tolist() == [1, 1, 3]
    assert examples["history"].tolist() == [[6, 5], [8, 7], [2, 0]]
    assert examples["targets"].tolist() == [[7, 6], [9, 8], [3, 2]]  # the item after each place
    places = examples["history"] > 0
    targets = np.sort(examples["targets"][places])
    assert targets.tolist() == [3, 6, 7, 8, 9]  # each event but a user's first, once
