"""The ranker's classical features: item co-occurrence similarity and its recency weighting."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.inference import candidate_features, cooccurrence, item_similarity


def test_item_similarity_is_shrunk_cosine_of_co_occurrence_with_an_empty_diagonal():
    # user 1 saw items 1, 2; user 2 saw 1, 2, 3; user 3 saw 3 (twice: counts once).
    users = np.array([1, 1, 2, 2, 2, 3, 3])
    items = np.array([1, 2, 1, 2, 3, 3, 3])
    similarity = item_similarity(users, items, n_items=4, shrink=1.0).toarray()
    assert similarity.shape == (5, 5)
    assert np.allclose(np.diag(similarity), 0.0)
    assert similarity[1, 2] == pytest.approx(2 / (np.sqrt(2) * np.sqrt(2) + 1))
    assert similarity[2, 3] == pytest.approx(1 / (np.sqrt(2) * np.sqrt(2) + 1))
    assert similarity[1, 4] == 0.0 and not similarity[0].any() and not similarity[:, 0].any()
    assert np.allclose(similarity, similarity.T)


def test_cooccurrence_halves_an_items_weight_every_half_life_of_later_events():
    similarity = item_similarity(np.array([1, 1, 2, 2]), np.array([1, 3, 2, 3]), n_items=3, shrink=0.0)
    recent = np.array([[1, 2, 0]])  # newest first: item 1 (weight 1), then item 2 (weight 0.5)
    candidates = np.array([[3, 1]])
    together = cooccurrence(similarity, recent, candidates, half_life=1.0)
    s = similarity.toarray()
    assert together[0, 0] == pytest.approx(1.0 * s[1, 3] + 0.5 * s[2, 3])
    assert together[0, 1] == pytest.approx(0.5 * s[2, 1])


def test_candidate_features_flatten_row_major_one_row_per_pair():
    inputs = candidate_features(
        user_idx=np.array([4, 7]),
        candidates=np.array([[1, 2, 3], [3, 2, 1]]),
        scores=np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.6]]),
        item_popularity=np.array([0.0, 10.0, 20.0, 30.0]),
        activity=np.array([5, 50]),
        together=np.zeros((2, 3)),
    )
    assert inputs["user_idx"].tolist() == [4, 4, 4, 7, 7, 7]
    assert inputs["item_idx"].tolist() == [1, 2, 3, 3, 2, 1]
    assert inputs["numeric"].shape == (6, 5)
    assert inputs["numeric"][3, 0] == pytest.approx(0.8)
    assert inputs["numeric"][3, 2] == pytest.approx(np.log1p(30.0))
    assert inputs["numeric"][5, 3] == pytest.approx(np.log1p(50))
