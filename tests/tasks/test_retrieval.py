"""The two-tower model's training examples (windows of each history, a next-item target at
every place) and their batches."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from tasks.retrieval import training_batches, training_examples


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


def test_a_pass_draws_each_window_once_in_batches_of_about_the_batch_size_cut_to_their_longest_window():
    rng = np.random.default_rng(0)
    n, length, batch_size = 3000, 20, 64
    fill = np.minimum(rng.geometric(0.2, n), length)  # most windows short, a few full
    history = np.where(np.arange(length) < fill[:, None], rng.integers(1, 500, (n, length)), 0).astype(np.int32)
    arrays = {"user_idx": np.arange(n, dtype=np.int32), "history": history,
              "targets": np.roll(history, 1, axis=1)}
    dataset, steps = training_batches(arrays, batch_size, seed=1, max_examples=10**9)
    assert steps == round(fill.sum() / batch_size)  # an epoch: one pass
    seen, sizes, places = [], [], 0
    for batch in dataset.take(steps):
        windows = batch["user_idx"].numpy()
        assert batch["history"].shape[1] == fill[windows].max()  # cut to the batch's longest window
        assert np.array_equal(batch["history"].numpy(), history[windows, : fill[windows].max()])
        seen.extend(windows)
        sizes.append(fill[windows].sum())
        places += batch["history"].shape[0] * batch["history"].shape[1]
    assert len(seen) == len(set(seen)) > 0.9 * n  # one pass: no window twice
    assert np.median(sizes) == pytest.approx(batch_size, rel=0.1)
    assert places < 1.2 * sum(sizes)  # few padded places computed (all 20 places: 4.4x)
