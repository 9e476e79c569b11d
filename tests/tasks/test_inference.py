"""Item co-occurrence similarity: the classical item-to-item signal behind co-visitation."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.inference import item_similarity


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
