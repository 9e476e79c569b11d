"""Item co-occurrence similarity: the classical item-to-item signal behind co-visitation."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.inference import item_similarities, item_similarity


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


def test_each_item_keeps_its_strongest_neighbours_and_ties_keep_the_lower_items():
    # Item 1 co-occurs with 2 (three users), 3 and 4 (two users each, a tie), 5 (one user).
    users = np.array([1, 1, 1, 2, 2, 2, 3, 3, 4, 4, 4, 5, 5])
    items = np.array([1, 2, 3, 1, 2, 4, 1, 2, 1, 3, 4, 1, 5])
    full = item_similarity(users, items, n_items=5, shrink=0.0, asymmetry=1.0).toarray()  # together / n_i
    kept = item_similarity(users, items, n_items=5, shrink=0.0, asymmetry=1.0, neighbours=2, block=2).toarray()
    assert np.allclose(full[1, 1:], np.array([0, 3, 2, 2, 1]) / 5)
    assert np.flatnonzero(kept[1]).tolist() == [2, 3]  # the strongest, then the lower of the tie
    assert np.allclose(kept[1, [2, 3]], full[1, [2, 3]])
    short = [row for row in range(2, 6) if np.count_nonzero(full[row]) <= 2]
    assert short and np.allclose(kept[short], full[short])  # rows within the width are kept whole


def test_similarities_of_several_settings_in_one_pass_equal_one_at_a_time():
    rng = np.random.default_rng(7)
    users, items = rng.integers(1, 60, 800), rng.integers(1, 40, 800)
    settings = [(0.0, 0.5), (10.0, 0.9), (3.0, 0.2)]
    together = item_similarities(users, items, 40, settings, neighbours=5, block=7)
    for (shrink, asymmetry), similarity in zip(settings, together, strict=True):
        alone = item_similarity(users, items, 40, shrink=shrink, asymmetry=asymmetry, neighbours=5, block=7)
        assert (similarity != alone).nnz == 0 and similarity.nnz == alone.nnz > 0
        assert np.diff(similarity.indptr).max() == 5
