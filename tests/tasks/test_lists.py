"""The final list: diversity re-ranking (maximal marginal relevance), new-item slots, explanations, the
category cap and short lists filled under the business rules."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.lists import _pairs_in, capped, diversify, explain, fill_short_lists, make_room_for_new_items, never_again


def test_diversity_trades_relevance_for_a_new_category_and_keeps_scores_non_increasing():
    relevance = np.array([[3.0, 2.9, 1.0, -np.inf]])  # the last slot holds no candidate
    categories = np.array([[[1, 0], [1, 0], [2, 0], [0, 0]]])  # 0 and 1 share category 1; 2 has its own
    picks, values = diversify(relevance, categories, k=4, weight=0.5)
    # rescaled relevance 1, 0.95, 0: after item 0, item 1 (same category) loses to item 2.
    assert picks[0, :3].tolist() == [0, 2, 1]
    assert values[0, :3] == pytest.approx([0.5, 0.0, 0.5 * 0.95 - 0.5 * 1.0])
    assert values[0, 3] == -np.inf  # no fourth candidate
    assert np.all(np.diff(values[0, :3]) <= 0)


def test_without_diversity_weight_the_list_follows_relevance():
    relevance = np.array([[0.1, 0.7, 0.4], [5.0, 1.0, 3.0]])
    categories = np.ones((2, 3, 1), dtype=int)
    picks, _ = diversify(relevance, categories, k=3, weight=0.0)
    assert picks.tolist() == [[1, 2, 0], [0, 2, 1]]


def test_each_recommendation_is_explained_by_the_most_similar_item_of_the_history():
    unit = np.array([[0, 0], [1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)  # row 0: padding
    top = np.array([[3, 4], [1, 2]])
    history = np.array([[1, 2, 0], [0, 0, 0]])  # the second user has no known history
    because, similarity = explain(unit, top, history)
    assert because[0].tolist() == [2, 2]  # item 3: 0.8 to item 2 against 0.6 to item 1; item 4: 0 against -1
    assert similarity[0] == pytest.approx([0.8, 0.0])
    assert because[1].tolist() == [0, 0] and np.isnan(similarity[1]).all()


def test_items_without_categories_count_as_alike_not_as_new():
    relevance = np.array([[1.0, 0.9, 0.1]])
    categories = np.array([[[0, 0], [0, 0], [5, 0]]])  # two uncategorised items and one in category 5
    picks, _ = diversify(relevance, categories, k=3, weight=0.6)
    assert picks[0].tolist() == [0, 2, 1]  # the second uncategorised item is like the first


def test_the_last_slots_go_to_the_best_retrieved_new_items_the_list_lacks():
    order = np.array([[0, 1, 2, 3], [0, 1, 2, 3], [3, 2, 1, 0]])  # positions in each user's candidate row
    new = np.zeros((3, 6), dtype=bool)
    new[0, [4, 5]] = True  # two new candidates, 4 retrieved before 5
    new[2, [2, 5]] = True  # candidate 2 is new but already listed
    placed_order, placed = make_room_for_new_items(order, new, slots=2)
    assert placed_order[0].tolist() == [0, 1, 4, 5] and placed[0].tolist() == [False, False, True, True]
    assert placed_order[1].tolist() == [0, 1, 2, 3] and not placed[1].any()  # no new candidates: unchanged
    assert placed_order[2].tolist() == [3, 2, 5, 0] and placed[2].tolist() == [False, False, True, False]
    assert order[0].tolist() == [0, 1, 2, 3]  # the input is left alone


def test_new_item_slots_never_take_a_rank_above_the_first_one_allowed():
    order = np.array([[0, 1, 2, 3]])
    new = np.zeros((1, 6), dtype=bool)
    new[0, [4, 5]] = True
    short, placed = make_room_for_new_items(order, new, slots=2, from_rank=4)
    assert short[0].tolist() == [0, 1, 2, 4] and placed[0].tolist() == [False, False, False, True]
    untouched, placed = make_room_for_new_items(order, new, slots=2, from_rank=5)  # the list ends at rank 4
    assert untouched[0].tolist() == [0, 1, 2, 3] and not placed.any()


def test_a_category_cap_skips_to_the_next_best_candidate_of_another_category():
    ranked = np.array([[5.0, 4.0, 3.0, 2.0, 1.0], [1.0, -np.inf, -np.inf, -np.inf, -np.inf]])
    categories = np.array([[[1, 0], [1, 3], [2, 0], [1, 2], [0, 0]]] * 2)  # uncategorised items are never capped
    picks, values = capped(ranked, categories, k=4, cap=1)
    assert picks[0, :3].tolist() == [0, 2, 4] and values[0, :3].tolist() == [5.0, 3.0, 1.0]
    assert values[0, 3] == -np.inf  # nothing else fits: the list ends
    assert picks[1, 0] == 0 and np.isinf(values[1, 1:]).all()


def test_a_new_item_slot_does_not_break_the_category_cap():
    order = np.array([[0, 1, 2]])  # listed: categories 1, 2, 3
    categories = np.array([[[1], [2], [3], [1], [4]]])
    new = np.array([[False, False, False, True, True]])  # candidate 3 (category 1) is retrieved before 4
    placed_order, placed = make_room_for_new_items(order, new, slots=1, categories=categories, cap=1)
    assert placed_order[0].tolist() == [0, 1, 4] and placed[0].tolist() == [False, False, True]


def test_a_list_the_rules_left_short_is_filled_from_the_fallback_order_under_the_same_rules():
    top = np.array([[7, 0, 0]])
    final = np.array([[2.5, -np.inf, -np.inf]])
    categories = np.zeros((10, 1), dtype=int)
    categories[[7, 3], 0] = 1
    blocked = (np.array([0]), np.array([5]))  # the user has seen (or may not see) item 5
    filled = fill_short_lists(top, final, np.array([7, 5, 3, 9, 8]), blocked, categories, cap=1)
    assert top[0].tolist() == [7, 9, 8]  # 7 is listed, 5 blocked, 3 over the cap (category 1)
    assert filled[0].tolist() == [False, True, True] and final[0].tolist() == [2.5, 2.5, 2.5]


def test_with_repeats_an_item_may_come_back_once_enough_days_have_passed_since_its_last_event():
    from dataclasses import replace

    import polars as pl

    from schemas.config import ListConfig
    from tasks.features import EXCLUSIONS, Features

    day, moment = 86_400, 100 * 86_400
    history = pl.DataFrame({"user_idx": [1, 1, 1, 2, 2], "item_idx": [10, 11, 10, 12, 13],
                            "timestamp": [moment - 60 * day, moment - 40 * day, moment - 5 * day, moment - 31 * day,
                                          None]})  # item 10 again 5 days ago; item 13 given with a request
    features = replace(Features(users=pl.DataFrame(), items=pl.DataFrame(), events=history,
                                item_categories=np.zeros((1, 1)), item_title=np.zeros((1, 1)),
                                item_popularity=np.zeros(1)), moment=moment,
                       exclusions=pl.DataFrame({"user_id": ["b", "someone"], "user_idx": [2, None], "item_idx": [14, 15]},
                                               schema=EXCLUSIONS))  # someone: no events tonight

    def blocked(lists: ListConfig) -> set[tuple[int, int]]:
        users, items = never_again(history, features, lists)
        return set(zip(users.to_list(), items.to_list()))

    assert blocked(ListConfig()) == {(1, 10), (1, 11), (2, 12), (2, 13), (2, 14)}  # off: everything seen, never again
    assert blocked(ListConfig(repeats=True, repeat_after_days=30)) == {(1, 10), (2, 13), (2, 14)}
    assert blocked(ListConfig(repeats=True, repeat_after_days=50)) == {(1, 10), (1, 11), (2, 12), (2, 13), (2, 14)}


def test_a_block_finds_exactly_its_users_pairs_among_all_of_them():
    rng = np.random.default_rng(0)
    users = np.sort(rng.integers(1, 50, 400)).astype(np.int32)  # sorted by user, as scoring keeps them
    items = rng.integers(0, 30, users.size)  # 0: an item the models do not know
    block = np.sort(rng.choice(np.arange(1, 60), 12, replace=False))  # some users without any pair
    rows, found = _pairs_in(block, users, items)
    expected = [(row, item) for user, item in zip(users, items) if item > 0
                for row in np.flatnonzero(block == user)]
    assert list(zip(rows.tolist(), found.tolist())) == [(int(r), int(i)) for r, i in expected]  # in the same order
    assert all(size == 0 for size in (x.size for x in _pairs_in(np.array([99]), users, items)))
