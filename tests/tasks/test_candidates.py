"""Candidates from two sources: the two-tower's nearest items, then co-visitation's."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from schemas.tables import CandidateSources
from tasks.candidates import FEATURES, covisitation, covisited, generate
from tasks.inference import item_similarity


def test_covisitation_halves_a_history_items_weight_every_half_life_of_later_events():
    similarity = item_similarity(np.array([1, 1, 2, 2]), np.array([1, 3, 2, 3]), n_items=3, shrink=0.0)
    recent = np.array([[1, 2, 0]])  # newest first: item 1 (weight 1), then item 2 (weight 0.5)
    scores = covisitation(similarity, recent, half_life=1.0)
    s = similarity.toarray()
    assert scores.shape == (1, 4)
    assert scores[0, 3] == pytest.approx(1.0 * s[1, 3] + 0.5 * s[2, 3])
    assert scores[0, 1] == pytest.approx(0.5 * s[2, 1])


def sources(two_tower: int, covisitation: int) -> CandidateSources:
    return CandidateSources(two_tower=two_tower, covisitation=covisitation, half_life=5.0, shrink=0.0, asymmetry=0.5)


def catalogue():
    """Six items on a line of embeddings; items 1-2-3 co-occur in histories, as do 4-5."""
    item_embeddings = np.array([[0.0], [6.0], [5.0], [4.0], [3.0], [2.0], [1.0]], dtype=np.float32)
    users = np.array([1, 1, 1, 2, 2, 3, 3])
    items = np.array([1, 2, 3, 1, 2, 4, 5])
    return item_embeddings, item_similarity(users, items, n_items=6, shrink=0.0)


def test_two_tower_candidates_come_first_then_covisited_items_not_among_them():
    item_embeddings, similarity = catalogue()
    queries = np.array([[1.0]], dtype=np.float32)  # prefers high embeddings: items 1, 2, 3, ...
    recent = np.array([[4, 0]])  # has seen item 4, which co-occurs with 5 only
    found = generate(queries, item_embeddings, recent, similarity, (np.array([0]), np.array([4])),
                     item_popularity=np.arange(7, dtype=np.float64), activity=np.array([1]),
                     sources=sources(two_tower=2, covisitation=3))
    assert found.items.shape == (1, 5) and found.numeric.shape == (1, 5, len(FEATURES))
    assert found.items[0, :2].tolist() == [1, 2]  # the two-tower's nearest, best first
    assert found.items[0, 2] == 5 and found.real[0].tolist() == [True, True, True, False, False]  # only 5 co-occurs
    assert 4 not in found.items[0][found.real[0]]  # seen: never proposed
    numeric = dict(zip(FEATURES, found.numeric[0, 2]))
    assert numeric["two_tower_score"] == pytest.approx(2.0) and found.two_tower[0, 2] == pytest.approx(2.0)
    assert numeric["from_covisitation"] == 1.0 and numeric["log_source_rank"] == 0.0
    assert numeric["covisitation_score"] == pytest.approx(similarity[4, 5])
    assert numeric["log_item_popularity"] == pytest.approx(np.log1p(5.0))
    assert found.numeric[0, 0, FEATURES.index("from_covisitation")] == 0.0


def test_a_list_of_k_gets_at_least_k_two_tower_candidates():
    item_embeddings, similarity = catalogue()
    found = generate(np.ones((3, 1), np.float32), item_embeddings, np.zeros((3, 2), np.int64), similarity,
                     (np.array([], np.int64), np.array([], np.int64)), np.zeros(7), np.zeros(3),
                     sources(two_tower=1, covisitation=2), at_least=4)
    assert found.items.shape == (3, 6)
    assert found.real[:, :4].all() and not found.real[:, 4:].any()  # no history: nothing co-occurs


def test_covisited_items_are_the_best_scored_unseen_ones_and_zero_when_nothing_co_occurs():
    _, similarity = catalogue()
    recent = np.array([[1, 0], [0, 0]])  # user 0 has seen item 1; user 1 nothing
    top = covisited(similarity, recent, (np.array([0]), np.array([2])), half_life=5.0, n=3)
    assert top[0].tolist() == [3, 0, 0]  # item 2 co-occurs more with 1 but is excluded; only 3 is left
    assert top[1].tolist() == [0, 0, 0]


def test_covisited_ties_keep_the_lower_items_where_the_list_cuts_through_them_in_any_stored_order():
    # item 1 is as similar to each of items 2-7, stored highest item first
    similarity = sp.csr_matrix((np.full(6, 0.5, np.float32), np.arange(7, 1, -1), np.array([0, 0, 6, 6, 6, 6, 6, 6, 6])),
                               shape=(8, 8))
    assert not similarity.has_sorted_indices
    top = covisited(similarity, np.array([[1], [1]]), (np.array([1]), np.array([2])), half_life=5.0, n=3)
    assert top.tolist() == [[2, 3, 4], [3, 4, 5]]  # the second user has item 2 excluded
    nothing = np.array([], np.int64)
    assert covisited(similarity, np.array([[1]]), (nothing, nothing), half_life=5.0, n=2).tolist() == [[2, 3]]


def test_no_covisited_items_when_none_are_asked_for():
    item_embeddings, similarity = catalogue()
    found = generate(np.ones((2, 1), np.float32), item_embeddings, np.array([[1, 0], [4, 0]]), similarity,
                     (np.array([], np.int64), np.array([], np.int64)), np.zeros(7), np.zeros(2),
                     sources(two_tower=3, covisitation=0))
    assert found.items.tolist() == [[1, 2, 3], [1, 2, 3]]
