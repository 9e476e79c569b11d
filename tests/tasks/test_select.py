"""The selection stage: the co-visitation similarity chosen on the validation split."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import scipy.sparse as sp

from schemas.tables import ModelDir, TrainedModel
from tasks.candidates import covisited
from tasks.features import load_features, user_histories
from tasks.featurize import build_features
from tasks.inference import as_table, item_similarity, read_selection, rows_of
from tasks.ingest import ingest
from tasks.metrics import ranking_metrics
from tasks.select import select
from tests.conftest import SMALL, make_run


@pytest.fixture(scope="module")
def features(tmp_path_factory):
    run = make_run(tmp_path_factory.mktemp("select"), synthetic=SMALL)
    return run, build_features(run, ingest(run))


def trained(tmp_path) -> TrainedModel:
    """A retrieval stage's record, pointing into a fresh staging models directory."""
    (tmp_path / "staging" / "retrieval").mkdir(parents=True)
    return TrainedModel(key="k", path=tmp_path / "staging" / "retrieval", epochs=1, metrics={})


def test_the_pair_with_the_best_validation_ndcg_is_chosen_and_stored_with_the_models_with_its_similarity(features, tmp_path):
    run, feature_set = features
    run = run.model_copy(update={"config": run.config.model_copy(update={"candidates": run.config.candidates.model_copy(
        update={"similarity_shrink": [0.0, 100.0], "similarity_asymmetry": [0.5, 0.9]})})})
    retrieval = trained(tmp_path)
    selection = select(run, feature_set, retrieval)

    assert [(t.shrink, t.asymmetry) for t in selection.trials] == [(0.0, 0.5), (0.0, 0.9), (100.0, 0.5), (100.0, 0.9)]
    assert all(t.ndcg is not None and 0 <= t.recall <= 1 for t in selection.trials)
    best = max(selection.trials, key=lambda t: t.ndcg)
    assert (selection.sources.shrink, selection.sources.asymmetry) == (best.shrink, best.asymmetry)
    assert selection.sources.covisitation == run.config.candidates.covisitation
    assert read_selection(ModelDir(path=retrieval.path.parent)) == selection

    # The chosen trial's score is co-visitation's own NDCG@10 on the validation split, recomputed here.
    loaded = load_features(feature_set.path)
    fit, valid = (loaded.events.filter(pl.col("split") == split) for split in ("fit", "valid"))
    users = loaded.sampled(np.unique(valid["user_idx"].to_numpy()))
    assert selection.users == users.size > 0
    similarity = item_similarity(fit["user_idx"].to_numpy(), fit["item_idx"].to_numpy(), loaded.n_items,
                                 shrink=best.shrink, asymmetry=best.asymmetry)
    stored = sp.load_npz(ModelDir(path=retrieval.path.parent).fit_similarity)  # for ranker training
    assert stored.shape == similarity.shape and (stored != similarity).nnz == 0
    top = covisited(similarity, user_histories(fit, loaded.n_users, 20)[users], rows_of(users, fit), 5.0, 10)
    truth = valid.select(pl.col("user_idx").alias("user"), pl.col("item_idx").alias("item"))
    assert ranking_metrics(as_table(users, top), truth, 10, loaded.n_items)["ndcg"] == pytest.approx(best.ndcg)


def test_pairs_past_the_time_budget_are_listed_but_not_scored(features, tmp_path):
    run, feature_set = features
    run = run.model_copy(update={"config": run.config.model_copy(update={"candidates": run.config.candidates.model_copy(
        update={"selection_seconds": 1e-9})})})
    selection = select(run, feature_set, trained(tmp_path))
    assert selection.trials[0].ndcg is not None and all(t.ndcg is None for t in selection.trials[1:])
    assert len(selection.trials) == 9
    assert (selection.sources.shrink, selection.sources.asymmetry) == (10.0, 0.5)  # the first pair, the only scored one
