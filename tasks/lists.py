"""Lists: from ranked candidates to each user's published list, and back.

`recommend` is the one path from a model directory (retrieval + ranking SavedModels and
their vocabularies) to top-K lists: draw candidates from both sources (tasks/candidates.py),
rank them, choose the list
(plain order, or maximal marginal relevance with `lists.diversity`), give the last
positions to new items (`lists.new_item_slots`) and explain each item by the history item
most like it. Scoring writes tonight's table with it and evaluation scores the held-out
split with it, so both judge the same lists.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
               "retrieval_score": pl.Float32, "because_item_id": pl.String, "reason": pl.String}


def recommend(
    models: ModelDir,
    features: Features,
    users: np.ndarray,
    history: pl.DataFrame,
    k: int,
    similarity: sp.csr_matrix | None = None,
    lists: ListConfig = ListConfig(),
) -> pl.DataFrame:
    """Top-`k` lists for `users` (tonight's user_idx) from the models in `models`, each
    recommendation explained by the history item most like it.

    `history` holds the events (tonight's indices, sorted by user and time) that form each
    user's sequence and that are never recommended again; `similarity` is
    `history_similarity(models, features, history)` when the caller already has it.
    Candidates come from the sources the models' ranker was trained on
    (tasks/candidates.py), and the ranker orders them. With
    `lists.diversity` above 0 the list is chosen from the ranked candidates by maximal
    marginal relevance over item categories (`diversify`), and `score` is that choice's
    objective; then the last `lists.new_item_slots` positions (from rank
    `lists.new_items_from_rank` on) go to new items (`make_room_for_new_items`). Users are
    scored USERS_PER_BLOCK at a time (two blocks side by side), in the order given.
    Returns one row per (user, rank) with the columns of RECS_SCHEMA.
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
    retrieval = RetrievalBundle.load(models)
    unit = retrieval.item_embeddings / np.maximum(np.linalg.norm(retrieval.item_embeddings, axis=1, keepdims=True), 1e-12)
    ranker = tf.saved_model.load(str(models.ranking_path)).signatures["score"]
    histories = item_map[user_histories(history, features.n_users, retrieval.history_length)]
    activity = np.bincount(history["user_idx"].to_numpy(), minlength=features.n_users + 1)
    seen_users, seen_items = history["user_idx"].to_numpy(), item_map[history["item_idx"].to_numpy()]
    if similarity is None:
        similarity = history_similarity(models, features, history)

    def one_block(start: int) -> pl.DataFrame:
        block = np.sort(users[start : start + USERS_PER_BLOCK])
        exclude = _pairs_in(block, seen_users, seen_items)
        found = generate(retrieval.queries(user_map[block], histories[block]), retrieval.item_embeddings,
                         histories[block], similarity, exclude, popularity, activity[block], sources, at_least=k)
        candidates, real = found.items, found.real
        ranked = ranker(user_idx=tf.constant(np.repeat(user_map[block], candidates.shape[1]).astype(np.int32)),
                        item_idx=tf.constant(candidates.ravel().astype(np.int32)),
                        numeric=tf.constant(found.numeric.reshape(-1, found.numeric.shape[-1])))["score"].numpy()
        ranked = np.where(real, ranked.reshape(candidates.shape), -np.inf)
        if lists.diversity > 0:
            order, final = diversify(ranked, categories[candidates], k, lists.diversity)
        else:
            order = np.argsort(-ranked, axis=1, kind="stable")[:, :k]
            final = np.take_along_axis(ranked, order, axis=1)
        order, placed = make_room_for_new_items(order, new[candidates] & real, lists.new_item_slots,
                                                lists.new_items_from_rank)
        top = np.take_along_axis(candidates, order, axis=1)
        because, closeness = explain(unit, top, histories[block])
        width = top.shape[1]
        return pl.DataFrame(
            {
                "user_idx": np.repeat(block, width).astype(np.int32),
                "rank": np.tile(np.arange(1, width + 1, dtype=np.int32), block.size),
                "item_id": item_ids[top.ravel()],
                "score": final.ravel().astype(np.float32),
                "retrieval_score": np.take_along_axis(found.two_tower, order, axis=1).ravel().astype(np.float32),
                "because_item_id": item_ids[because.ravel()],
                "because_title": titles[because.ravel()],
                "similarity": np.char.mod("%.2f", closeness.ravel()),
                "new": placed.ravel(),
            },
            schema_overrides={"item_id": pl.String, "because_item_id": pl.String, "because_title": pl.String},
        )

    # Two blocks at a time: candidate generation is mostly numpy, single-threaded but
    # releasing the GIL, so one block's candidates are drawn while the other's are ranked.
    # The blocks are joined in order: the lists do not depend on the threads.
    with ThreadPoolExecutor(max_workers=2) as pool:
        frames = list(pool.map(one_block, range(0, users.size, USERS_PER_BLOCK)))
    recs = pl.concat(frames) if frames else pl.DataFrame(
        schema=RECS_SCHEMA | {"because_title": pl.String, "similarity": pl.String, "new": pl.Boolean}
    )
    reason = (
        pl.when(pl.col("because_item_id").is_null())
        .then(pl.lit("matches your profile (none of your recent items is known to the model)"))
        .otherwise(pl.format('similar to "{}" in your recent history (similarity {})', "because_title", "similarity"))
    )
    reason = pl.when(pl.col("new")).then(pl.lit("new in the catalogue; ") + reason).otherwise(reason)
    return recs.filter(pl.col("score").is_finite()).with_columns(reason.alias("reason")).select(RECS_SCHEMA.keys())


def make_room_for_new_items(
    order: np.ndarray, new: np.ndarray, slots: int, from_rank: int = 1
) -> tuple[np.ndarray, np.ndarray]:
    """Give the last `slots` positions of each list (`order`: positions in the candidate
    rows), but none above rank `from_rank`, to the best-retrieved new items among that
    user's candidates (`new`, a mask over the candidate rows, two-tower ones first, in its
    order) that the list lacks. Positions stay where there is no such item, and each keeps
    its score, so scores stay non-increasing. Returns the new order and a mask of the
    positions given to new items."""
    order = order.copy()
    placed = np.zeros(order.shape, dtype=bool)
    first = max(order.shape[1] - slots, from_rank - 1)
    if first >= order.shape[1] or not new.any():
        return order, placed
    rows = np.arange(order.shape[0])
    left = new.copy()
    left[rows[:, None], order] = False  # already in the list
    for position in range(first, order.shape[1]):
        best = left.argmax(axis=1)
        found = left[rows, best]
        order[found, position] = best[found]
        placed[found, position] = True
        left[rows[found], best[found]] = False
    return order, placed


def diversify(relevance: np.ndarray, categories: np.ndarray, k: int, weight: float) -> tuple[np.ndarray, np.ndarray]:
    """Maximal marginal relevance: pick `k` of each row's candidates one at a time, each the
    best by (1 - weight) * relevance - weight * (its largest category similarity to the
    items already picked). Returns (positions in the row, the objective at each pick).

    `relevance` (users, candidates) is the ranker's score, -inf where there is no candidate;
    it is rescaled to [0, 1] per user. `categories` (users, candidates, C) holds category
    indices (0 = none); similarity is the cosine of two items' category sets, and items
    without categories count as one category of their own (else they would always look
    new). The objective never increases from one pick to the next, so it serves as the
    list's score.
    """
    users, n = relevance.shape
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
        objective = np.where(real, (1 - weight) * scaled - weight * penalty, -np.inf)
        pick = objective.argmax(axis=1)
        picks[:, step], values[:, step] = pick, objective[rows, pick]
        real[rows, pick] = False
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
    """(row in sorted `block`, item) for events of users in `block`, unknown items dropped."""
    row = np.minimum(np.searchsorted(block, users), block.size - 1)
    keep = (block[row] == users) & (items > 0)
    return row[keep], items[keep]
