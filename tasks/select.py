"""Selection: the co-visitation source's item similarity, chosen every night on the
validation split.

Fifth stage of the nightly DAG, between the two trainings. Datasets differ in how much an
item's popularity should weigh in its similarity to others (in short e-commerce histories a
popular history item says little about the next purchase; in long movie histories plain
cosine does best) and in how far rare co-occurrences can be trusted. Rather than a default
fitted to one of them, this stage scores every pair of `candidates.similarity_shrink` x
`candidates.similarity_asymmetry` on the pipeline's own validation split (similarity and
histories from `fit`, truth the `valid` items of the sampled users) by NDCG@10 of
co-visitation's own top 10, and keeps the best (a tie keeps the earlier pair). Pairs are
tried in order while `candidates.selection_seconds` lasts: the first always, another only
when it should end within the budget, taking as long as the last (a budget is where the
selection ends, not the last moment a pair may start). Their similarities are built
in one pass over the co-occurrence counts (several passes where a catalogue is too large
for all of them in `SIMILARITY_BYTES`). The choice is stored with the
models (settings.json), so the ranker trains and scoring runs on it, and so is its
similarity, which ranker training then reads rather than computes again; the trials go to
MLflow (`selection.csv`, `selection_*` metrics) and to the Prefect UI.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import polars as pl
import scipy.sparse as sp

from schemas.config import Run
from schemas.tables import CandidateSources, FeatureSet, ModelDir, Selection, TrainedModel, Trial
from tasks.candidates import covisited
from tasks.features import load_features, user_histories
from tasks.inference import NEIGHBOURS, as_table, item_similarities, read_selection, rows_of, save_settings
from tasks.metrics import ranking_metrics
from tasks.stage import stage

log = logging.getLogger(__name__)

CUTOFF = 10
SIMILARITY_BYTES = 2**30  # similarities built in one pass (about 12 bytes per kept pair)


def select(run: Run, features: FeatureSet, retrieval: TrainedModel) -> Selection:
    """Choose the co-visitation similarity for the models being trained (or reuse the choice
    stored with them) and record it in their directory."""
    cfg = run.config.candidates
    if retrieval.reused and (found := read_selection(ModelDir.of(run.workspace, retrieval.key))) is not None:
        return found.model_copy(update={"reused": True})
    loaded = load_features(features.path)
    fit = loaded.events.filter(pl.col("split") == "fit")
    valid = loaded.events.filter(pl.col("split") == "valid")
    users = loaded.sampled(np.unique(valid["user_idx"].to_numpy()))
    recent = user_histories(fit, loaded.n_users, run.config.features.history_length)[users]
    exclude = rows_of(users, fit)
    truth = valid.filter(pl.col("user_idx").is_in(users.tolist())).select(
        pl.col("user_idx").alias("user"), pl.col("item_idx").alias("item")
    )
    staging = ModelDir(path=retrieval.path.parent)
    pairs = [(shrink, asymmetry) for shrink in cfg.similarity_shrink for asymmetry in cfg.similarity_asymmetry]
    at_once = max(1, SIMILARITY_BYTES // (12 * NEIGHBOURS * (loaded.n_items + 1)))
    started, trials = time.perf_counter(), []
    built = scored = 0.0  # seconds the last similarity build and the last pair's scoring took
    for first in range(0, len(pairs), at_once):
        batch, similarities, shared = pairs[first : first + at_once], None, 0.0
        for at, (shrink, asymmetry) in enumerate(batch):
            expected = scored + (built if similarities is None else 0.0)
            if trials and (users.size == 0 or time.perf_counter() - started + expected > cfg.selection_seconds):
                trials.append(Trial(shrink=shrink, asymmetry=asymmetry))  # not scored
                continue
            tried = time.perf_counter()
            if similarities is None:  # the batch's co-occurrence counts are computed once, for all its pairs
                similarities = item_similarities(fit["user_idx"].to_numpy(), fit["item_idx"].to_numpy(),
                                                 loaded.n_items, batch)
                built = time.perf_counter() - tried
                shared, tried = built / len(batch), time.perf_counter()
            top = covisited(similarities[at], recent, exclude, cfg.half_life, max(CUTOFF, cfg.covisitation))
            trial = Trial(
                shrink=shrink, asymmetry=asymmetry,
                ndcg=ranking_metrics(as_table(users, top[:, :CUTOFF]), truth, CUTOFF, loaded.n_items)["ndcg"],
                recall=ranking_metrics(as_table(users, top), truth, top.shape[1], loaded.n_items)["recall"],
                seconds=round(shared + time.perf_counter() - tried, 2),
            )
            if all(trial.ndcg > other.ndcg for other in trials if other.ndcg is not None):  # the best so far
                sp.save_npz(staging.fit_similarity, similarities[at], compressed=False)
            trials.append(trial)
            scored = time.perf_counter() - tried
    best = max((trial for trial in trials if trial.ndcg is not None), key=lambda trial: trial.ndcg)
    sources = CandidateSources(two_tower=cfg.two_tower, covisitation=cfg.covisitation, half_life=cfg.half_life,
                               shrink=best.shrink, asymmetry=best.asymmetry)
    selection = Selection(key=retrieval.key, sources=sources, trials=trials, users=int(users.size))
    save_settings(staging, selection)
    log.info("selection: shrink %g, asymmetry %g (NDCG@%d %.4f on %d validation users; %d of %d pairs scored)",
             best.shrink, best.asymmetry, CUTOFF, best.ndcg, users.size, sum(t.ndcg is not None for t in trials),
             len(trials))
    return selection


def _select_and_report(run: Run, features: FeatureSet, retrieval: TrainedModel) -> Selection:
    """`select`, with its trials as the run's `selection` table in the Prefect UI."""
    from prefect.artifacts import create_table_artifact

    selection = select(run, features, retrieval)
    chosen = (selection.sources.shrink, selection.sources.asymmetry)
    rows = [{"shrink": t.shrink, "asymmetry": t.asymmetry, "chosen": "yes" if (t.shrink, t.asymmetry) == chosen else "",
             "ndcg@10": "" if t.ndcg is None else f"{t.ndcg:.4f}",
             "candidate recall": "" if t.recall is None else f"{t.recall:.4f}", "seconds": t.seconds}
            for t in selection.trials]
    create_table_artifact(rows, key="selection", description="co-visitation similarity: validation scores")
    return selection


select_task = stage("select", _select_and_report)
