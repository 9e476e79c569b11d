"""Ranking metrics against hand-computed values, and top-N retrieval: exact and through an HNSW graph."""

from __future__ import annotations

from math import log2

import numpy as np
import polars as pl
import pytest

from tasks.inference import ANN_FROM, approximate, item_graph, retrieve
from tasks.metrics import list_metrics, ranking_metrics


def recs_table(lists: dict[int, list[int]]) -> pl.DataFrame:
    rows = [(user, item, rank) for user, items in lists.items() for rank, item in enumerate(items, start=1)]
    return pl.DataFrame(rows, schema=["user", "item", "rank"], orient="row")


def truth_table(relevant: dict[int, list[int]]) -> pl.DataFrame:
    rows = [(user, item) for user, items in relevant.items() for item in items]
    return pl.DataFrame(rows, schema=["user", "item"], orient="row")


# k = 3 over a catalogue of 10 items.
#   user 1: relevant {1, 2}; list 5, 1, 2        -> hits at ranks 2 and 3
#   user 2: relevant {3, 4, 6, 7}; list 3, 9, 4, 6 -> hits at ranks 1 and 3 (rank 4 is past k)
#   user 3: relevant {8}; no list               -> all zeros
#   user 4: no relevant items; list 2           -> only counts towards coverage
RECS = recs_table({1: [5, 1, 2], 2: [3, 9, 4, 6], 4: [2]})
TRUTH = truth_table({1: [1, 2], 2: [3, 4, 6, 7], 3: [8]})


def test_metrics_match_hand_computed_values():
    metrics = ranking_metrics(RECS, TRUTH, k=3, n_items=10)

    ndcg_1 = (1 / log2(3) + 1 / log2(4)) / (1 + 1 / log2(3))  # ideal: 2 relevant
    ndcg_2 = (1 / log2(2) + 1 / log2(4)) / (1 + 1 / log2(3) + 1 / log2(4))  # ideal: min(3, 4)
    assert metrics["recall"] == pytest.approx((2 / 2 + 2 / 3 + 0) / 3, abs=1e-12)
    assert metrics["ndcg"] == pytest.approx((ndcg_1 + ndcg_2 + 0) / 3, abs=1e-12)
    assert metrics["map"] == pytest.approx(((1 / 2 + 2 / 3) / 2 + (1 / 1 + 2 / 3) / 3 + 0) / 3, abs=1e-12)
    assert metrics["hitrate"] == pytest.approx(2 / 3, abs=1e-12)
    assert metrics["mrr"] == pytest.approx((1 / 2 + 1 / 1 + 0) / 3, abs=1e-12)
    assert metrics["coverage"] == pytest.approx(6 / 10, abs=1e-12)  # {5, 1, 2, 3, 9, 4}


def test_metrics_to_the_digit():
    metrics = ranking_metrics(RECS, TRUTH, k=3, n_items=10)

    assert round(metrics["recall"], 6) == 0.555556
    assert round(metrics["ndcg"], 6) == 0.465781
    assert round(metrics["map"], 6) == 0.37963
    assert round(metrics["mrr"], 6) == 0.5


def test_recall_divides_by_k_when_more_items_are_relevant_than_k():
    recs = recs_table({1: [1, 2]})
    truth = truth_table({1: [1, 2, 3, 4, 5]})

    metrics = ranking_metrics(recs, truth, k=2, n_items=5)

    assert metrics["recall"] == 1.0
    assert metrics["ndcg"] == pytest.approx(1.0)
    assert metrics["map"] == pytest.approx(1.0)


def test_a_perfect_list_scores_one_everywhere():
    recs = recs_table({1: [4, 2], 2: [1]})
    truth = truth_table({1: [2, 4], 2: [1]})

    metrics = ranking_metrics(recs, truth, k=2, n_items=4)

    assert {name: metrics[name] for name in ("recall", "ndcg", "map", "hitrate", "mrr")} == pytest.approx(
        {"recall": 1.0, "ndcg": 1.0, "map": 1.0, "hitrate": 1.0, "mrr": 1.0}
    )
    assert metrics["coverage"] == 3 / 4


def test_a_user_with_truth_but_no_recommendations_counts_as_all_zeros():
    recs = recs_table({1: [7]})
    truth = truth_table({1: [7], 2: [7]})

    metrics = ranking_metrics(recs, truth, k=5, n_items=10)

    assert {name: metrics[name] for name in ("recall", "ndcg", "map", "hitrate", "mrr")} == pytest.approx(
        {"recall": 0.5, "ndcg": 0.5, "map": 0.5, "hitrate": 0.5, "mrr": 0.5}
    )


def test_no_recommendations_at_all_scores_zero():
    recs = pl.DataFrame(schema={"user": pl.Int64, "item": pl.Int64, "rank": pl.Int64})
    truth = truth_table({1: [1], 2: [2, 3]})

    metrics = ranking_metrics(recs, truth, k=10, n_items=10)

    assert metrics == {"recall": 0.0, "ndcg": 0.0, "map": 0.0, "hitrate": 0.0, "mrr": 0.0, "coverage": 0.0}


def test_relevant_items_listed_twice_count_once():
    recs = recs_table({1: [1, 9]})
    truth = truth_table({1: [1, 1, 2]})

    metrics = ranking_metrics(recs, truth, k=2, n_items=10)

    assert metrics["recall"] == pytest.approx(1 / 2)


# --- retrieve ------------------------------------------------------------------------


@pytest.fixture
def embeddings():
    rng = np.random.default_rng(7)
    queries = rng.normal(size=(9, 4)).astype(np.float32)
    items = rng.normal(size=(31, 4)).astype(np.float32)  # row 0 = padding, 30 real items
    items[0] = queries.sum(axis=0) * 100  # padding would win every list if it were scored
    scores = queries @ items.T
    scores[:, 0] = -np.inf
    best = np.argsort(-scores, axis=1)[:, :3]
    exclude_rows = np.repeat(np.arange(9), 3)[::-1].copy()  # unsorted on purpose
    exclude_items = best.ravel()[::-1].copy()
    return queries, items, (exclude_rows, exclude_items)


def test_retrieve_returns_the_top_items_in_descending_score_order(embeddings):
    queries, items, exclude = embeddings

    top, scores = retrieve(queries, items, exclude, n=5)

    full = queries @ items.T
    for row in range(queries.shape[0]):
        allowed = [item for item in np.argsort(-full[row]) if item != 0 and item not in exclude[1][exclude[0] == row]]
        assert top[row].tolist() == allowed[:5]
        assert scores[row] == pytest.approx(full[row, top[row]], rel=1e-5)
        assert np.all(np.diff(scores[row]) <= 0)


def test_retrieve_never_returns_the_padding_item_or_excluded_pairs(embeddings):
    queries, items, exclude = embeddings

    top, _ = retrieve(queries, items, exclude, n=20)

    assert not np.any(top == 0)
    returned = {(row, item) for row in range(top.shape[0]) for item in top[row]}
    assert returned.isdisjoint(zip(exclude[0].tolist(), exclude[1].tolist()))
    assert all(len(set(row)) == row.size for row in top)


def test_retrieve_gives_the_same_result_one_row_at_a_time_as_in_one_block(embeddings):
    queries, items, exclude = embeddings

    one_by_one = retrieve(queries, items, exclude, n=6, block=1)
    blocks_of_four = retrieve(queries, items, exclude, n=6, block=4)
    all_at_once = retrieve(queries, items, exclude, n=6, block=1024)

    for result in (one_by_one, blocks_of_four):
        np.testing.assert_array_equal(result[0], all_at_once[0])
        np.testing.assert_allclose(result[1], all_at_once[1], rtol=1e-6)  # BLAS sums blocks differently


def test_retrieve_asks_for_at_most_the_catalogue():
    queries = np.ones((2, 1), np.float32)
    items = np.array([[100.0], [1.0], [3.0], [2.0]], np.float32)

    top, scores = retrieve(queries, items, (np.array([], np.int64), np.array([], np.int64)), n=10)

    assert top.tolist() == [[2, 3, 1], [2, 3, 1]]
    assert scores.tolist() == [[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]


# --- retrieve through a graph (retrieval.index: ann) -------------------------------------


@pytest.fixture(scope="module")
def catalogue():
    """4,000 items in 100 clusters (dim 16), 300 users near them; the users' seen items
    (0-40 each; users 0-2 have 2,500, more than a graph search could leave room for) and 10% of the items
    off the shelves."""
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(100, 16))
    items = (centres[rng.integers(0, 100, 4001)] + 0.5 * rng.normal(size=(4001, 16))).astype(np.float32)
    queries = (items[rng.integers(1, 4001, 300)] + 0.5 * rng.normal(size=(300, 16))).astype(np.float32)
    seen = rng.integers(0, 41, 300)
    seen[:3] = 2500
    rows = np.repeat(np.arange(300), seen)
    exclude = (rows, np.concatenate([rng.choice(np.arange(1, 4001), size, replace=False) for size in seen]))
    allowed = rng.random(4001) > 0.1
    return queries, items, exclude, allowed


def test_a_graph_search_finds_the_exact_top_items_but_a_few_and_keeps_every_rule(catalogue):
    queries, items, exclude, allowed = catalogue
    exact, _ = retrieve(queries, items, exclude, 50, allowed=allowed)

    top, scores = retrieve(queries, items, exclude, 50, allowed=allowed, graph=item_graph(items))

    found = np.mean([np.intersect1d(a, b).size / 50 for a, b in zip(top, exact)])
    assert 0.98 <= found < 1  # approximate, and close
    excluded = set(zip(*(part.tolist() for part in exclude)))
    assert all((row, item) not in excluded for row in range(300) for item in top[row].tolist())
    assert (top > 0).all() and allowed[top].all() and all(len(set(row)) == 50 for row in top)
    np.testing.assert_allclose(scores, np.einsum("ud,und->un", queries, items[top]), rtol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    np.testing.assert_array_equal(top[:3], exact[:3])  # most items seen: short from the graph, searched exactly


def test_a_graph_search_gives_the_same_lists_rebuilt_and_in_shards(catalogue):
    queries, items, exclude, allowed = catalogue
    whole, _ = retrieve(queries, items, exclude, 50, allowed=allowed, graph=item_graph(items))
    rebuilt = item_graph(items)
    for start in (0, 120):
        inside = (exclude[0] >= start) & (exclude[0] < start + 180)
        shard, _ = retrieve(queries[start : start + 180], items, (exclude[0][inside] - start, exclude[1][inside]), 50,
                            allowed=allowed, graph=rebuilt)
        np.testing.assert_array_equal(shard, whole[start : start + 180])


def test_a_graph_in_parts_finds_the_exact_top_items_but_a_few_and_the_same_rebuilt(catalogue):
    queries, items, exclude, allowed = catalogue
    exact, _ = retrieve(queries, items, exclude, 50)

    top, scores = retrieve(queries, items, exclude, 50, graph=item_graph(items, parts=2))

    found = np.mean([np.intersect1d(a, b).size / 50 for a, b in zip(top, exact)])
    assert 0.98 <= found <= 1
    assert top[:, :25].max() > 2000 and top[:, :25].min() <= 2000  # items of both parts, numbered as the catalogue
    np.testing.assert_allclose(scores, np.einsum("ud,und->un", queries, items[top]), rtol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    excluded = set(zip(*(part.tolist() for part in exclude)))
    assert all((row, item) not in excluded for row in range(300) for item in top[row].tolist())
    again, _ = retrieve(queries, items, exclude, 50, graph=item_graph(items, parts=2))
    np.testing.assert_array_equal(again, top)
    with pytest.raises(ValueError, match="allowed"):
        retrieve(queries, items, exclude, 50, allowed=allowed, graph=item_graph(items, parts=2))


def test_where_a_graph_search_comes_back_short_the_user_is_searched_exactly(catalogue):
    queries, items, exclude, _ = catalogue
    allowed = np.zeros(items.shape[0], bool)
    allowed[1:31] = True  # 30 items on the shelves: a search for 50 cannot fill a list

    top, scores = retrieve(queries, items, exclude, 50, allowed=allowed, graph=item_graph(items))

    exact = retrieve(queries, items, exclude, 50, allowed=allowed)
    np.testing.assert_array_equal(top, exact[0])
    np.testing.assert_array_equal(scores, exact[1])  # -inf past the last item that qualifies


def test_the_index_setting_chooses_the_search_and_auto_follows_the_catalogue_size():
    assert approximate("ann", 10) and not approximate("exact", 10 * ANN_FROM)
    assert not approximate("auto", ANN_FROM - 1) and approximate("auto", ANN_FROM)


def test_list_metrics_match_hand_computed_values():
    # Items 1..4 (0 = padding). Fit events: item 1 x3, item 2 x1. Categories: 1 {a, b}, 2 {a}, 3 {c}, 4 none.
    popularity = np.array([0.0, 3.0, 1.0, 0.0, 0.0])
    categories = np.array([[0, 0], [1, 2], [1, 0], [3, 0], [0, 0]])
    metrics = list_metrics(recs_table({1: [1, 2], 2: [3, 4]}), popularity, categories, k=2)
    # diversity: user 1: 1 - 1/sqrt(2*1); user 2's pair involves item 4 (no categories): left out.
    assert metrics["diversity"] == pytest.approx(1 - 1 / np.sqrt(2))
    # novelty: smoothed shares (p + 1) / (4 + 4) = 1/2, 1/4, 1/8, 1/8 -> 1, 2, 3, 3 bits.
    assert metrics["novelty"] == pytest.approx(((1 + 2) / 2 + (3 + 3) / 2) / 2)
    # popularity percentiles, ties at their average rank: item 1 -> 4/4, item 2 -> 3/4, items 3 and 4 -> 1.5/4.
    assert metrics["popularity_bias"] == pytest.approx(((1.0 + 0.75) / 2 + (0.375 + 0.375) / 2) / 2)
