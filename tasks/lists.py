"""Lists: from ranked candidates to each user's published list, and back.

`recommend_blocks` (all blocks at once: `recommend`) is the one path from a model directory
(retrieval + ranking SavedModels and their vocabularies) to top-K lists, block by block of
users: draw candidates from both sources (tasks/candidates.py), rank them, choose the list
(plain order, or maximal marginal relevance with `lists.diversity`), give the last
positions to new items (`lists.new_item_slots`), fill a list the rules left short from the
fallback order, and explain each item by the history item most like it. Scoring writes
tonight's table with it, evaluation scores the held-out split with it and the registered
MLflow model answers with it, so all three judge and serve the same lists.

It is also where the business rules hold (docs/lists.md, "Business rules"; evaluated per
night by the features stage): only servable items are candidates (`servable_items`), a
user's excluded items are blocked like the ones they have seen, and `lists.max_per_category`
caps each category in a list.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import polars as pl
import scipy.sparse as sp

from schemas.config import ListConfig
from schemas.tables import CandidateSources, ModelDir
from tasks.candidates import generate
from tasks.features import MAX_CATEGORIES, Features, padded, user_histories
from tasks.inference import RetrievalBundle, candidate_settings, item_similarity, model_item_map, model_user_map
from tasks.workspace import RecflowError

USERS_PER_BLOCK = 1024
RECS_SCHEMA = {"user_idx": pl.Int32, "rank": pl.Int32, "item_id": pl.String, "score": pl.Float32,
               "retrieval_score": pl.Float32, "because_item_id": pl.String, "reason": pl.String,
               "filled": pl.Boolean}  # filled: from the fallback order, the rules having left too few candidates
FILLED_REASON = "popular lately (the business rules left too few of your candidates)"


def recommend(*args, **kwargs) -> pl.DataFrame:
    """`recommend_blocks(*args, **kwargs)`, as one frame."""
    blocks = list(recommend_blocks(*args, **kwargs))
    return pl.concat(blocks) if blocks else pl.DataFrame(schema=RECS_SCHEMA)


def recommend_blocks(
    models: ModelDir,
    features: Features,
    users: np.ndarray,
    history: pl.DataFrame,
    k: int,
    similarity: sp.csr_matrix | None = None,
    lists: ListConfig = ListConfig(),
    fit_model: bool = False,
) -> Iterator[pl.DataFrame]:
    """Top-`k` lists for `users` (tonight's user_idx) from the models in `models`, each
    recommendation explained by the history item most like it; with `fit_model`, from the
    two-tower model trained on the fit split alone (the evaluation's).

    `history` holds the events (tonight's indices, sorted by user and time) that form each
    user's sequence and that are never recommended again, nor is any pair of
    `features.exclusions` or any item `features.servable` rules out; `similarity` is
    `history_similarity(models, features, history)` when the caller already has it.
    Candidates come from the sources the models' ranker was trained on
    (tasks/candidates.py), and the ranker orders them. With
    `lists.diversity` above 0 the list is chosen from the ranked candidates by maximal
    marginal relevance over item categories (`diversify`), and `score` is that choice's
    objective; then the last `lists.new_item_slots` positions (from rank
    `lists.new_items_from_rank` on) go to new items (`make_room_for_new_items`), every
    choice within `lists.max_per_category`. A list with fewer than `k` candidates left is
    filled from `features.fallback_order()` under the same rules (`fill_short_lists`).
    Users are scored USERS_PER_BLOCK at a time (two blocks side by side), in the order
    given. Yields each block's lists, in that order (a caller that writes them as they come
    never holds them all): one row per (user, rank) with the columns of RECS_SCHEMA, the
    block's users sorted.
    """
    from tasks.tfenv import tf

    sources = _sources(models)
    user_map = model_user_map(models, features)
    item_map = model_item_map(models, features)
    model_items = pl.read_parquet(models.items, columns=["item_id", "item_idx", "title", "categories_idx"])
    model_items = model_items.sort("item_idx")
    item_ids = np.concatenate([[None], model_items["item_id"].to_numpy()]).astype(object)
    titles = np.concatenate([[None], model_items["title"].fill_null(model_items["item_id"]).to_numpy()]).astype(object)
    categories = padded(model_items["categories_idx"], MAX_CATEGORIES)
    new = np.zeros(item_ids.size, dtype=bool)  # in tonight's catalogue, nobody has interacted with them yet
    new[item_map[features.items.filter(pl.col("popularity") == 0)["item_idx"].to_numpy()]] = True
    new[0] = False
    popularity = np.load(models.item_popularity)
    retrieval = RetrievalBundle.load(models, fit_model)
    unit = retrieval.item_embeddings / np.maximum(np.linalg.norm(retrieval.item_embeddings, axis=1, keepdims=True), 1e-12)
    ranker = tf.saved_model.load(str(models.ranking_path)).signatures["score"]
    histories = item_map[user_histories(history, features.n_users, retrieval.history_length)]
    activity = np.bincount(history["user_idx"].to_numpy(), minlength=features.n_users + 1)
    blocked_users, blocked_items = (array.to_numpy() for array in never_again(history, features, lists))
    by_user = np.argsort(blocked_users, kind="stable")  # once: a block then finds its pairs by binary search
    blocked_users, blocked_items = blocked_users[by_user], item_map[blocked_items[by_user]]
    allowed = servable_items(features, item_map, item_ids.size)
    fallback = item_map[features.fallback_order()]
    fallback = fallback[fallback > 0]  # items the models do not know cannot be scored or explained
    if similarity is None:
        similarity = history_similarity(models, features, history)

    def one_block(start: int) -> pl.DataFrame:
        block = np.sort(users[start : start + USERS_PER_BLOCK])
        blocked = _pairs_in(block, blocked_users, blocked_items)
        found = generate(retrieval.queries(user_map[block], histories[block]), retrieval.item_embeddings,
                         histories[block], similarity, blocked, popularity, activity[block], sources, at_least=k,
                         allowed=allowed, graph=retrieval.graph)
        candidates, real = found.items, found.real
        ranked = ranker(user_idx=tf.constant(np.repeat(user_map[block], candidates.shape[1]).astype(np.int32)),
                        item_idx=tf.constant(candidates.ravel().astype(np.int32)),
                        numeric=tf.constant(found.numeric.reshape(-1, found.numeric.shape[-1])))["score"].numpy()
        ranked = np.where(real, ranked.reshape(candidates.shape), -np.inf)
        top, final, order, placed, filled = choose_lists(ranked, candidates, new[candidates] & real, categories, k,
                                                         lists, fallback, blocked)
        retrieval_score = np.take_along_axis(found.two_tower, order, axis=1).astype(np.float32)
        retrieval_score[filled] = np.nan
        because, closeness = explain(unit, top, histories[block])
        width = top.shape[1]
        recs = pl.DataFrame(
            {
                "user_idx": np.repeat(block, width).astype(np.int32),
                "rank": np.tile(np.arange(1, width + 1, dtype=np.int32), block.size),
                "item_id": item_ids[top.ravel()],
                "score": final.ravel().astype(np.float32),
                "retrieval_score": retrieval_score.ravel(),
                "because_item_id": item_ids[because.ravel()],
                "because_title": titles[because.ravel()],
                "similarity": np.char.mod("%.2f", closeness.ravel()),
                "new": placed.ravel(),
                "filled": filled.ravel(),
            },
            schema_overrides={"item_id": pl.String, "because_item_id": pl.String, "because_title": pl.String},
        ).with_columns(pl.col("retrieval_score").fill_nan(None))
        reason = (
            pl.when(pl.col("because_item_id").is_null())
            .then(pl.lit("matches your profile (none of your recent items is known to the model)"))
            .otherwise(pl.format('similar to "{}" in your recent history (similarity {})', "because_title",
                                 "similarity"))
        )
        reason = pl.when(pl.col("new")).then(pl.lit("new in the catalogue; ") + reason).otherwise(reason)
        reason = pl.when(pl.col("filled")).then(pl.lit(FILLED_REASON)).otherwise(reason)
        because = pl.when(pl.col("filled")).then(None).otherwise(pl.col("because_item_id"))
        return (recs.filter(pl.col("score").is_finite())
                .with_columns(reason.alias("reason"), because.alias("because_item_id"))
                .select(RECS_SCHEMA.keys()))

    # Two blocks at a time: candidate generation is mostly numpy, single-threaded but
    # releasing the GIL, so one block's candidates are drawn while the other's are ranked.
    # Blocks are yielded in order (the lists do not depend on the threads), at most one
    # waiting beside the two being scored.
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending: deque[Future] = deque()
        for start in range(0, users.size, USERS_PER_BLOCK):
            pending.append(pool.submit(one_block, start))
            if len(pending) > 2:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def never_again(history: pl.DataFrame, features: Features, lists: ListConfig) -> tuple[pl.Series, pl.Series]:
    """(user_idx, item_idx) of the pairs no list may hold: what the user has interacted with
    (with `lists.repeats`, only within `lists.repeat_after_days` of the moment the lists go
    out; an event without a time counts as now) and tonight's exclusions."""
    seen = history.select("user_idx", "item_idx")
    if lists.repeats and features.moment is not None and "timestamp" in history.columns:
        recent = features.moment - lists.repeat_after_days * 86_400
        last = history.group_by("user_idx", "item_idx").agg(pl.col("timestamp").max())
        seen = last.filter(pl.col("timestamp").is_null() | (pl.col("timestamp") > recent)).select("user_idx", "item_idx")
    excluded = features.exclusions.drop_nulls("user_idx").select("user_idx", "item_idx")
    pairs = pl.concat([seen, excluded], how="vertical_relaxed")
    return pairs["user_idx"], pairs["item_idx"]


def choose_lists(
    ranked: np.ndarray, candidates: np.ndarray, new: np.ndarray, categories: np.ndarray, k: int, lists: ListConfig,
    fallback: np.ndarray, blocked: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, ...]:
    """Each user's list from their ranked candidates, under the list settings and the rules.

    `ranked` (users, n) scores the candidate items `candidates` (-inf: no candidate; the
    candidate sources already left out what the rules forbid), `new` marks the new ones,
    `categories` (items, C) holds every item's category indices. The list is the ranking's
    top `k` (or the maximal-marginal-relevance choice with `lists.diversity`), at most
    `lists.max_per_category` per category, with the new-item slots, and filled from
    `fallback` where the candidates run out (`blocked`: (row, item) pairs never to list).
    Returns (items, scores (-inf past a list's end), the candidate position of each item,
    the positions given to new items, the positions filled from the fallback).
    """
    cap, listed = lists.max_per_category, categories[candidates]
    if lists.diversity > 0:
        order, final = diversify(ranked, listed, k, lists.diversity, cap)
    elif cap is not None:
        order, final = capped(ranked, listed, k, cap)
    else:
        order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
        final = np.take_along_axis(ranked, order, axis=1)
    order, placed = make_room_for_new_items(order, new, lists.new_item_slots, lists.new_items_from_rank, listed, cap,
                                            np.isfinite(final))
    top = np.take_along_axis(candidates, order, axis=1)
    filled = fill_short_lists(top, final, fallback, blocked, categories, cap)
    return top, final, order, placed, filled


def servable_items(features: Features, item_map: np.ndarray, size: int) -> np.ndarray | None:
    """The models' items (a mask over their `size` item indices, padding included) that
    tonight's lists may show: in tonight's catalogue and servable (`item_map`: tonight's
    item_idx -> the models'). None when that is every item the models know, so the rules
    cost nothing when there are none."""
    allowed = np.zeros(size, dtype=bool)
    allowed[item_map[features.servable]] = True
    allowed[0] = False
    return None if allowed[1:].all() else allowed


def capped(ranked: np.ndarray, categories: np.ndarray, k: int, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's best `k` candidates by `ranked` (-inf = no candidate) with at most `cap` of
    them sharing a category (`categories` (users, n, C): category indices, 0 = none; items
    without categories are not capped). Returns (positions in the row, their scores), -inf
    where the row runs out."""
    users, n = ranked.shape
    by_score = np.argsort(-ranked, axis=1, kind="stable")
    counts = np.zeros((users, int(categories.max(initial=0)) + 1), dtype=np.int32)
    picks = np.zeros((users, min(k, n)), dtype=np.int64)
    values = np.full(picks.shape, -np.inf)
    taken = np.zeros(users, dtype=np.int64)
    active = np.arange(users)  # rows with room left and candidates left
    for column in range(n):
        candidate = by_score[active, column]
        score = ranked[active, candidate]
        active, candidate, score = active[np.isfinite(score)], candidate[np.isfinite(score)], score[np.isfinite(score)]
        if active.size == 0:
            break
        cats = categories[active, candidate]
        take = ~_over_cap(counts[active], cats, cap)
        rows = active[take]
        picks[rows, taken[rows]], values[rows, taken[rows]] = candidate[take], score[take]
        counts[rows[:, None], cats[take]] += 1
        taken[rows] += 1
        active = active[taken[active] < picks.shape[1]]
    return picks, values


def _over_cap(counts: np.ndarray, cats: np.ndarray, cap: int | None) -> np.ndarray:
    """True where an item with category indices `cats` (rows, ..., C) would exceed `cap` in
    its row's list, whose category counts are `counts` (rows, categories)."""
    if cap is None:
        return np.zeros(cats.shape[:-1], dtype=bool)
    rows = np.arange(counts.shape[0]).reshape((-1,) + (1,) * (cats.ndim - 1))
    return ((counts[rows, cats] >= cap) & (cats > 0)).any(-1)


def fill_short_lists(
    top: np.ndarray, final: np.ndarray, fallback: np.ndarray, blocked: tuple[np.ndarray, np.ndarray],
    categories: np.ndarray, cap: int | None,
) -> np.ndarray:
    """Fill, in place, the positions of each list (`top`, model items; `final`, its scores)
    that the rules left empty (score -inf, at the end) with the first items of `fallback`
    (servable, most popular lately first) that the row does not block (`blocked`: (row,
    item) pairs), does not list yet and that fit the cap. A filled position takes the score
    of the last real one, so scores stay non-increasing. Returns the mask of filled
    positions."""
    filled = np.zeros(top.shape, dtype=bool)
    short = np.flatnonzero(~np.isfinite(final).all(axis=1))
    if short.size == 0 or fallback.size == 0:
        return filled
    by_row = np.argsort(blocked[0], kind="stable")
    rows, items = blocked[0][by_row], blocked[1][by_row]
    for row in short:
        empty = np.flatnonzero(~np.isfinite(final[row]))
        real = top[row, : empty[0]]
        low, high = np.searchsorted(rows, [row, row + 1])
        taken = set(items[low:high].tolist()) | set(real.tolist())
        counts = np.bincount(categories[real].ravel(), minlength=int(categories.max(initial=0)) + 1)
        score = final[row, empty[0] - 1] if empty[0] > 0 else 0.0
        position = 0
        for item in fallback:
            if position == empty.size:
                break
            if item in taken or _over_cap(counts[None], categories[item][None], cap)[0]:
                continue
            top[row, empty[position]], final[row, empty[position]] = item, score
            filled[row, empty[position]] = True
            counts[categories[item][categories[item] > 0]] += 1
            taken.add(item)
            position += 1
    return filled


def make_room_for_new_items(
    order: np.ndarray, new: np.ndarray, slots: int, from_rank: int = 1, categories: np.ndarray | None = None,
    cap: int | None = None, listed: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Give the last `slots` positions of each list (`order`: positions in the candidate
    rows), but none above rank `from_rank`, to the best-retrieved new items among that
    user's candidates (`new`, a mask over the candidate rows, two-tower ones first, in its
    order) that the list lacks and that keep it within `cap` items per category
    (`categories` (users, n, C) of the candidate rows; `listed` marks the positions that
    hold a real item). Positions stay where there is no such item, and each keeps its
    score, so scores stay non-increasing. Returns the new order and a mask of the positions
    given to new items."""
    order = order.copy()
    placed = np.zeros(order.shape, dtype=bool)
    first = max(order.shape[1] - slots, from_rank - 1)
    if first >= order.shape[1] or not new.any():
        return order, placed
    rows = np.arange(order.shape[0])
    left = new.copy()
    left[rows[:, None], order] = False  # already in the list
    if cap is not None:
        listed = np.ones(order.shape, bool) if listed is None else listed
        in_list = np.where(listed[..., None], np.take_along_axis(categories, order[..., None], axis=1), 0)
        counts = np.zeros((order.shape[0], int(categories.max(initial=0)) + 1), dtype=np.int32)
        np.add.at(counts, (np.broadcast_to(rows[:, None, None], in_list.shape), in_list), 1)
    for position in range(first, order.shape[1]):
        fits = left
        if cap is not None:
            leaving = np.where(listed[:, position, None], categories[rows, order[:, position]], 0)
            counts[rows[:, None], leaving] -= (leaving > 0)
            fits = left & ~_over_cap(counts, categories, cap)
        best = fits.argmax(axis=1)
        found = fits[rows, best]
        order[found, position] = best[found]
        placed[found, position] = True
        left[rows[found], best[found]] = False
        if cap is not None:
            arriving = np.where(found[:, None], categories[rows, order[:, position]],
                                np.where(listed[:, position, None], categories[rows, order[:, position]], 0))
            counts[rows[:, None], arriving] += (arriving > 0)
    return order, placed


def diversify(
    relevance: np.ndarray, categories: np.ndarray, k: int, weight: float, cap: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Maximal marginal relevance: pick `k` of each row's candidates one at a time, each the
    best by (1 - weight) * relevance - weight * (its largest category similarity to the
    items already picked). Returns (positions in the row, the objective at each pick).

    `relevance` (users, candidates) is the ranker's score, -inf where there is no candidate;
    it is rescaled to [0, 1] per user. `categories` (users, candidates, C) holds category
    indices (0 = none); similarity is the cosine of two items' category sets, and items
    without categories count as one category of their own (else they would always look
    new). The objective never increases from one pick to the next, so it serves as the
    list's score. With `cap`, no pick takes a category past `cap` items.
    """
    users, n = relevance.shape
    counts = np.zeros((users, int(categories.max(initial=0)) + 1), dtype=np.int32)
    capped_categories = categories
    real = np.isfinite(relevance)
    low = np.min(relevance, axis=1, where=real, initial=np.inf, keepdims=True)
    high = np.max(relevance, axis=1, where=real, initial=-np.inf, keepdims=True)
    scaled = np.where(real, (relevance - low) / np.where(high > low, high - low, 1.0), -np.inf)
    categories = categories.copy()
    categories[..., 0] = np.where((categories > 0).any(-1), categories[..., 0], -1)  # -1: "no category"
    sizes = (categories != 0).sum(-1)
    rows = np.arange(users)
    penalty = np.zeros((users, n))
    picks = np.zeros((users, min(k, n)), dtype=np.int64)
    values = np.full((users, min(k, n)), -np.inf)
    for step in range(picks.shape[1]):
        eligible = real & ~_over_cap(counts, capped_categories, cap)
        objective = np.where(eligible, (1 - weight) * scaled - weight * penalty, -np.inf)
        pick = objective.argmax(axis=1)
        picks[:, step], values[:, step] = pick, objective[rows, pick]
        real[rows, pick] = False
        if cap is not None:
            picked = np.where(np.isfinite(values[:, step])[:, None], capped_categories[rows, pick], 0)
            counts[rows[:, None], picked] += (picked > 0)
        chosen = categories[rows, pick]
        shared = ((categories[:, :, :, None] == chosen[:, None, None, :]) & (chosen[:, None, None, :] != 0)).sum((2, 3))
        similarity = shared / np.sqrt(np.maximum(sizes * sizes[rows, pick][:, None], 1))
        penalty = np.maximum(penalty, similarity)
    return picks, values


def explain(unit_items: np.ndarray, top: np.ndarray, history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each recommended item in `top` (users, k), the item of the user's `history`
    (users, L; model indices, 0 = padding) whose candidate-tower embedding is most similar
    (cosine; `unit_items` are the normalised embeddings) and that similarity. The item is
    0 and the similarity NaN when the history holds no item the model knows."""
    similarity = np.einsum("ukd,uld->ukl", unit_items[top], unit_items[history])
    similarity = np.where(history[:, None, :] > 0, similarity, -np.inf)
    best = similarity.argmax(axis=-1)
    because = np.take_along_axis(history, best, axis=1)
    closeness = np.take_along_axis(similarity, best[..., None], axis=-1)[..., 0]
    return because, np.where(because > 0, closeness, np.nan).astype(np.float32)


def history_similarity(models: ModelDir, features: Features, history: pl.DataFrame) -> sp.csr_matrix:
    """The item co-occurrence similarity of `history` as the models' selection chose it,
    in the models' item indices: what co-visitation draws candidates from; computed once
    and shared by all scoring shards."""
    sources = _sources(models)
    n_items = pl.read_parquet(models.items, columns=["item_idx"]).height
    items = model_item_map(models, features)[history["item_idx"].to_numpy()]
    return item_similarity(history["user_idx"].to_numpy(), items, n_items, shrink=sources.shrink,
                           asymmetry=sources.asymmetry)


def _sources(models: ModelDir) -> CandidateSources:
    sources = candidate_settings(models)
    if sources is None:
        raise RecflowError(f"{models.path} holds models of an earlier recflow that this version cannot score; "
                           "retrain them (rerun the date) or restore the earlier version")
    return sources


def _pairs_in(block: np.ndarray, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row in `block`, item) for the pairs (`users` sorted, `items`) of the users in
    `block`, unknown items dropped: work in the block's pairs, not in all of them (a scan of
    every pair per block made scoring grow with users x events)."""
    keys = block.astype(users.dtype)  # as `users`: numpy would otherwise convert all of them, per block
    low, high = np.searchsorted(users, keys, "left"), np.searchsorted(users, keys, "right")
    counts = high - low
    rows = np.repeat(np.arange(block.size), counts)
    at = np.arange(counts.sum()) + np.repeat(low - (np.cumsum(counts) - counts), counts)
    keep = items[at] > 0
    return rows[keep], items[at][keep]
