"""Metrics: plain functions over tables with explicit column names, tested to the digit.

The one evaluation code path: the evaluation stage scores every model it compares with
these functions, and so do the benchmarks (bench/), so numbers compare.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from scipy.stats import rankdata

from tasks.features import padded


def ranking_metrics(recs: pl.DataFrame, truth: pl.DataFrame, k: int, n_items: int) -> dict[str, float]:
    """Recall, NDCG, MAP, hit rate and MRR at `k`, averaged over users in `truth`, and coverage.

    `recs` has columns user, item, rank (1 = best); `truth` has user, item (the held-out
    relevant items). A user in `truth` without recommendations counts as all misses.
    Recall@k divides hits by min(k, #relevant); gains are binary; coverage is the share of
    the `n_items` catalogue that appears in any list.
    """
    top = recs.filter(pl.col("rank") <= k).select("user", "item", "rank")
    relevant = truth.select("user", "item").unique()
    per_user_relevant = relevant.group_by("user").agg(pl.len().alias("n_relevant"))
    hits = top.join(relevant, on=["user", "item"], how="inner").sort("user", "rank")
    discount = 1.0 / (pl.col("rank") + 1).cast(pl.Float64).log(2)
    hit_number = pl.int_range(1, pl.len() + 1).over("user")
    per_user = (
        hits.group_by("user")
        .agg(
            pl.len().alias("hits"),
            discount.sum().alias("dcg"),
            (hit_number / pl.col("rank")).sum().alias("precision_sum"),
            (1.0 / pl.col("rank").min()).alias("reciprocal_rank"),
        )
        .join(per_user_relevant, on="user", how="right")
        .fill_null(0)
        .with_columns(pl.min_horizontal(pl.col("n_relevant"), pl.lit(k)).alias("ideal"))
    )
    ideal = per_user["ideal"].to_numpy()
    idcg = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))[np.maximum(ideal, 1) - 1]
    users = max(per_user.height, 1)
    return {
        "recall": float((per_user["hits"] / per_user["ideal"]).sum() / users),
        "ndcg": float((per_user["dcg"].to_numpy() / idcg).sum() / users),
        "map": float((per_user["precision_sum"] / per_user["ideal"]).sum() / users),
        "hitrate": float((per_user["hits"] > 0).sum() / users),
        "mrr": float(per_user["reciprocal_rank"].sum() / users),
        "coverage": float(top["item"].n_unique() / max(n_items, 1)),
    }


def list_metrics(
    recs: pl.DataFrame, item_popularity: np.ndarray, item_categories: np.ndarray, k: int
) -> dict[str, float]:
    """Beyond accuracy, averaged over users with a list: intra-list `diversity` (mean
    1 - cosine of the category sets of each pair of items in a top-`k` list, pairs with
    an uncategorised item left out), `novelty` (mean self-information -log2 p of the
    items, p their smoothed share of the training events) and `popularity_bias` (mean
    popularity percentile of the items, ties sharing their average rank: 1 = the most
    popular, about 0.5 for lists drawn at random).

    `recs` has columns user, item (an item index; unknown items < 1 are skipped), rank;
    `item_popularity` (training events) and `item_categories` (category indices, 0 = none)
    are indexed by item, row 0 the padding item.
    """
    top = recs.filter((pl.col("rank") <= k) & (pl.col("item") > 0)).sort("user", "rank")
    if top.is_empty():
        return {"diversity": 0.0, "novelty": 0.0, "popularity_bias": 0.0}
    popularity = item_popularity[1:]
    share = np.concatenate([[1.0], (popularity + 1) / (popularity.sum() + popularity.size)])
    percentile = np.concatenate([[0.0], rankdata(popularity, method="average") / popularity.size])
    per_user = top.with_columns(
        pl.Series("information", -np.log2(share[top["item"].to_numpy()])),
        pl.Series("percentile", percentile[top["item"].to_numpy()]),
    ).group_by("user").agg(pl.col("information").mean(), pl.col("percentile").mean())
    lists = padded(top.group_by("user", maintain_order=True).agg(pl.col("item"))["item"], k)[1:]
    return {
        "diversity": _intra_list_diversity(item_categories[lists], lists > 0),
        "novelty": float(per_user["information"].mean()),
        "popularity_bias": float(per_user["percentile"].mean()),
    }


def _intra_list_diversity(categories: np.ndarray, present: np.ndarray, block: int = 4096) -> float:
    """Mean over lists with two or more categorised items of their mean pairwise category
    dissimilarity (0 when no list has two); `categories` (lists, k, C) holds category
    indices, 0 = none."""
    k = present.shape[1]
    totals = []
    for start in range(0, present.shape[0], block):
        cats, real = categories[start : start + block], present[start : start + block]
        sizes = (cats > 0).sum(-1)
        shared = ((cats[:, :, None, :, None] == cats[:, None, :, None, :]) & (cats[:, :, None, :, None] > 0)).sum((3, 4))
        cosine = shared / np.sqrt(np.maximum(sizes[:, :, None] * sizes[:, None, :], 1))
        real = real & (sizes > 0)
        pairs = real[:, :, None] & real[:, None, :] & ~np.eye(k, dtype=bool)
        counted = pairs.sum((1, 2)) > 0
        totals.append(((1 - cosine) * pairs).sum((1, 2))[counted] / pairs.sum((1, 2))[counted])
    values = np.concatenate(totals)
    return float(values.mean()) if values.size else 0.0
