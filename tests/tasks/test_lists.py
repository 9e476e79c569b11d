"""The final list: diversity re-ranking (maximal marginal relevance), new-item slots, explanations."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.lists import diversify, explain, make_room_for_new_items


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
