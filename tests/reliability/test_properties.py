"""Properties of the metrics and of the top-K path, on inputs hypothesis makes up."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.config import ListConfig
from tasks.inference import as_table, item_graph, retrieve
from tasks.metrics import ranking_metrics
from tasks.workspace import write_parquet


@st.composite
def retrieval_cases(draw):
    n_users = draw(st.integers(1, 12))
    n_items = draw(st.integers(2, 40))
    dim = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(n_users, dim)).astype(np.float32)
    items = rng.normal(size=(n_items + 1, dim)).astype(np.float32)
    seen = rng.random((n_users, n_items + 1)) < draw(st.floats(0, 0.6))
    seen[:, 0] = False
    k = draw(st.integers(1, n_items))
    return queries, items, seen, k, draw(st.integers(1, 5))


@settings(max_examples=150, deadline=None)
@given(retrieval_cases())
def test_top_k_lists_are_distinct_unseen_best_first_and_truly_the_best(case):
    queries, items, seen, k, block = case
    rows, item_ids = np.nonzero(seen)
    top, scores = retrieve(queries, items, (rows, item_ids), k, block=block)
    table = as_table(np.arange(len(queries)), top)
    assert table.group_by("user").agg(pl.col("rank").sort()).sort("user")["rank"].to_list() == [
        list(range(1, k + 1))
    ] * len(queries)
    all_scores = queries @ items.T
    for user in range(len(queries)):
        available = np.flatnonzero(~seen[user])
        available = available[available > 0]
        real = np.isfinite(scores[user])
        assert real.sum() == min(k, available.size)  # fewer only when the catalogue runs out
        picked = top[user][real]
        assert len(set(picked.tolist())) == picked.size and not seen[user, picked].any() and (picked > 0).all()
        assert (np.diff(scores[user][real]) <= 0).all()
        best = np.sort(all_scores[user, available])[::-1][: picked.size]
        np.testing.assert_allclose(scores[user][real], best, rtol=1e-5, atol=1e-5)


@settings(max_examples=150, deadline=None)
@given(retrieval_cases(), st.booleans())
def test_top_k_lists_through_a_graph_keep_every_rule(case, shelves):
    queries, items, seen, k, _ = case
    rows, item_ids = np.nonzero(seen)
    allowed = np.random.default_rng(k).random(items.shape[0]) > 0.3 if shelves else None
    top, scores = retrieve(queries, items, (rows, item_ids), k, allowed=allowed, graph=item_graph(items))
    for user in range(len(queries)):
        available = np.flatnonzero(~seen[user] & (True if allowed is None else allowed))
        available = available[available > 0]
        real = np.isfinite(scores[user])
        assert real.sum() == min(k, available.size)
        picked = top[user][real]
        assert len(set(picked.tolist())) == picked.size and np.isin(picked, available).all()
        assert (np.diff(scores[user][real]) <= 0).all()
        np.testing.assert_allclose(scores[user][real], queries[user] @ items[picked].T, rtol=1e-5, atol=1e-5)


@st.composite
def ranked_lists(draw):
    n_users, n_items, k = draw(st.integers(1, 8)), draw(st.integers(1, 30)), draw(st.integers(1, 10))
    recs, truth = [], []
    for user in range(n_users):
        ranked = draw(st.lists(st.integers(1, n_items), unique=True, max_size=k))
        recs += [(user, item, rank) for rank, item in enumerate(ranked, start=1)]
        truth += [(user, item) for item in draw(st.lists(st.integers(1, n_items), unique=True, min_size=1, max_size=6))]
    frame = pl.DataFrame(recs, schema={"user": pl.Int64, "item": pl.Int64, "rank": pl.Int64}, orient="row")
    return frame, pl.DataFrame(truth, schema={"user": pl.Int64, "item": pl.Int64}, orient="row"), k, n_items


@settings(max_examples=200, deadline=None)
@given(ranked_lists())
def test_metrics_stay_in_range_and_perfect_lists_score_one(case):
    recs, truth, k, n_items = case
    metrics = ranking_metrics(recs, truth, k, n_items)
    assert all(0.0 <= value <= 1.0 + 1e-9 for value in metrics.values()), metrics
    assert metrics["recall"] <= metrics["hitrate"] + 1e-9 and metrics["mrr"] <= metrics["hitrate"] + 1e-9
    perfect = (
        truth.with_columns(pl.int_range(1, pl.len() + 1).over("user").alias("rank"))
        .filter(pl.col("rank") <= k)
    )
    best = ranking_metrics(perfect, truth, k, n_items)
    assert best["recall"] == best["hitrate"] == 1.0 and best["ndcg"] == pytest.approx(1.0)
    assert metrics["ndcg"] <= best["ndcg"] + 1e-9


IDS = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60)


@settings(max_examples=100, deadline=None)
@given(st.lists(IDS, min_size=1, max_size=20, unique=True))
def test_any_id_string_round_trips_through_the_published_table(tmp_path_factory, ids):
    path = tmp_path_factory.mktemp("ids") / "part-00000.parquet"
    written = pl.DataFrame({"user_id": ids, "item_id": list(reversed(ids)), "rank": list(range(1, len(ids) + 1))})
    write_parquet(written, path)
    assert pl.read_parquet(path).to_dicts() == written.to_dicts()


@settings(max_examples=100, deadline=None)
@given(st.lists(IDS, min_size=1, max_size=20, unique=True))
def test_any_id_string_round_trips_through_csv_ingestion(tmp_path_factory, ids):
    from tasks.ingest import read_directory

    directory = tmp_path_factory.mktemp("csv")
    pl.DataFrame({"user_id": ids, "item_id": ids, "timestamp": list(range(len(ids)))}).write_csv(
        directory / "interactions.csv"
    )
    interactions, _, _ = read_directory(directory)
    assert interactions["user_id"].to_list() == ids and interactions["item_id"].to_list() == ids


@st.composite
def list_cases(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    users, n = draw(st.integers(1, 8)), draw(st.integers(1, 30))
    relevance = rng.normal(size=(users, n))
    relevance[rng.random((users, n)) < draw(st.floats(0, 0.5))] = -np.inf  # missing candidates
    categories = rng.integers(0, 5, size=(users, n, 3))
    new = rng.random((users, n)) < draw(st.floats(0, 0.5))
    return (relevance, categories, new, draw(st.integers(1, n)), draw(st.floats(0, 0.99)), draw(st.integers(0, 3)),
            draw(st.integers(1, 12)))


@settings(max_examples=150, deadline=None)
@given(list_cases())
def test_final_lists_are_distinct_real_candidates_with_non_increasing_scores(case):
    from tasks.lists import diversify, make_room_for_new_items

    relevance, categories, new, k, weight, slots, from_rank = case
    picks, values = diversify(relevance, categories, k, weight)
    for row, (pick, value) in enumerate(zip(picks, values)):
        real = np.isfinite(value)
        assert len(set(pick[real])) == real.sum() and np.isfinite(relevance[row, pick[real]]).all()
        assert real.sum() == min(k, np.isfinite(relevance[row]).sum())  # every real candidate until k
        assert np.all(np.diff(value[real]) <= 1e-12)  # the objective never rises
        assert real.all() or not real[real.argmin():].any()  # missing candidates only at the end
    order, placed = make_room_for_new_items(picks, new & np.isfinite(relevance), slots, from_rank)
    for row in range(order.shape[0]):
        real = np.isfinite(values[row])  # positions past the user's real candidates are dropped later
        assert len(set(order[row][real])) == real.sum() and not placed[row][~real].any()
        assert new[row, order[row][placed[row]]].all()
        assert (order[row][~placed[row]] == picks[row][~placed[row]]).all()
        assert not placed[row, : max(0, order.shape[1] - slots, from_rank - 1)].any()  # only the last slots move


@st.composite
def rule_cases(draw):
    """Lists under business rules: a catalogue where only `allowed` items may be shown,
    (user, item) pairs blocked (seen or excluded), candidates as the candidate sources give
    them (allowed, unblocked, in some order; -inf past a user's last), a category cap or
    none, diversity, new-item slots and the fallback order."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    users, n_items, n = draw(st.integers(1, 6)), draw(st.integers(1, 30)), draw(st.integers(1, 12))
    allowed = rng.random(n_items + 1) < draw(st.floats(0.05, 1.0))
    allowed[0] = False
    blocked = rng.random((users, n_items + 1)) < draw(st.floats(0, 0.6))
    categories = np.where(rng.random((n_items + 1, 2)) < 0.8, rng.integers(1, 5, (n_items + 1, 2)), 0)
    categories[categories[:, 1] == categories[:, 0], 1] = 0  # an item's categories are distinct
    categories[0] = 0
    candidates = np.zeros((users, n), np.int64)
    ranked = np.full((users, n), -np.inf)
    for row in range(users):
        pool = rng.permutation(np.flatnonzero(allowed & ~blocked[row]))[: draw(st.integers(0, n))]
        candidates[row, : pool.size] = pool
        ranked[row, : pool.size] = rng.normal(size=pool.size)
    new = np.isfinite(ranked) & (rng.random((users, n)) < 0.3)
    lists = ListConfig(diversity=draw(st.sampled_from([0.0, 0.0, 0.4])), new_item_slots=draw(st.integers(0, 2)),
                       new_items_from_rank=draw(st.integers(1, 4)),
                       max_per_category=draw(st.one_of(st.none(), st.integers(1, 3))))
    fallback = rng.permutation(np.flatnonzero(allowed))
    return ranked, candidates, new, categories, draw(st.integers(1, 10)), lists, fallback, allowed, blocked


@settings(max_examples=200, deadline=None)
@given(rule_cases())
def test_lists_under_the_rules_hold_only_servable_unblocked_items_within_the_cap(case):
    from tasks.lists import choose_lists

    ranked, candidates, new, categories, k, lists, fallback, allowed, blocked = case
    pairs = np.nonzero(blocked)
    top, final, _, _, filled = choose_lists(ranked, candidates, new, categories, k, lists, fallback, pairs)
    for row in range(top.shape[0]):
        listed = top[row][np.isfinite(final[row])]
        assert len(set(listed.tolist())) == listed.size  # distinct
        assert allowed[listed].all() and not blocked[row, listed].any()  # servable, never blocked
        assert np.all(np.diff(final[row][np.isfinite(final[row])]) <= 1e-12)  # ranked by score
        assert not filled[row][~np.isfinite(final[row])].any()
        if lists.max_per_category is not None:
            counts = np.bincount(categories[listed][categories[listed] > 0], minlength=5)
            assert counts.max(initial=0) <= lists.max_per_category  # the cap holds
        else:
            assert listed.size == min(k, top.shape[1], (allowed & ~blocked[row]).sum())  # min(K, servable)
