"""The real nightly flow, end to end, on small synthetic data (Prefect, GE, TFRS, MLflow all real).

One run (`nightly_run`) is shared by the tests that only read what it wrote. A test that
runs the flow again does so in its own copy of that workspace (`copy_of_run`), so no test
changes what another one asserts on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import polars as pl
import pytest

from schemas.config import RetrievalConfig
from schemas.tables import RECOMMENDATIONS
from tasks.ingest import generate_synthetic
from tests.conftest import RUN_DATE, SMALL, cli, small_config


def mlflow_client(workspace: Path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{workspace / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def nightly_run(prefect_server, tmp_path_factory):
    from flows.nightly import nightly

    workspace = tmp_path_factory.mktemp("workspace")
    summary = nightly(small_config(workspace))
    return workspace, summary


@pytest.fixture
def copy_of_run(nightly_run, tmp_path):
    """A copy of the shared run's workspace, and the config of a run in it.

    The copy's runs track into their own MLflow experiment: the copied experiment would
    keep storing its artifacts in the original workspace.
    """
    workspace, summary = nightly_run
    copy = tmp_path / "workspace"
    shutil.copytree(workspace, copy)

    def config(**changes):
        return small_config(copy, mlflow_experiment="recflow-copy", **changes)

    return copy, summary, config


def test_output_table_follows_the_contract(nightly_run):
    workspace, _ = nightly_run
    partition = workspace / "recommendations" / f"run_date={RUN_DATE}"
    table = pl.read_parquet(partition / "*.parquet")
    interactions = pl.read_parquet(workspace / "snapshots" / f"run_date={RUN_DATE}" / "interactions.parquet")
    assert table.schema == RECOMMENDATIONS
    assert table.equals(table.sort("user_id", "rank"))  # written block by block, in order
    assert set(table["user_id"]) == set(interactions["user_id"])  # every user known to the run
    per_user = table.group_by("user_id").agg(
        pl.len().alias("n"), pl.col("item_id").n_unique().alias("distinct"), pl.col("rank").sort().alias("ranks"),
        (pl.col("score").sort_by("rank").diff().drop_nulls() <= 0).all().alias("non_increasing"),
    )
    assert (per_user["n"] == 10).all() and (per_user["distinct"] == 10).all()
    assert per_user["ranks"].to_list()[0] == list(range(1, 11))
    assert per_user["non_increasing"].all()
    assert table.join(interactions, on=["user_id", "item_id"], how="semi").is_empty()  # nothing already seen
    assert set(table["item_id"]) <= set(generate_synthetic(SMALL, RUN_DATE, 42)[1]["item_id"])
    assert (table["run_date"] == RUN_DATE).all()
    assert not list(workspace.glob(".tmp/*"))  # no staged leftovers


def test_run_is_tracked_in_mlflow_with_a_registered_champion(nightly_run):
    workspace, summary = nightly_run
    client = mlflow_client(workspace)
    run = client.get_run(summary["nightly_run_id"])
    assert run.info.status == "FINISHED"
    for metric in ("ndcg_at_10", "recall_at_10", "map_at_10", "hitrate_at_10", "mrr_at_10", "coverage_at_10",
                   "diversity_at_10", "novelty_at_10", "popularity_bias_at_10", "popularity_novelty_at_10",
                   "retrieval_ndcg_at_10", "popularity_ndcg_at_10", "time_train_retrieval_s", "output_rows",
                   "fallback_rows", "similar_items_rows"):
        assert metric in run.data.metrics, metric
    assert run.data.params["retrieval.embedding_dim"] == str(RetrievalConfig().embedding_dim)
    assert run.data.tags["run_date"] == RUN_DATE.isoformat()
    champion = client.get_model_version_by_alias("recflow-retrieval", "champion")
    assert champion.run_id == run.info.run_id
    assert client.get_model_version_by_alias("recflow-ranking", "champion").run_id == run.info.run_id
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.csv", "recommender", "validation"} <= artifacts
    table = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    assert set(table["model_version"]) == {str(champion.version)}
    assert (workspace / "models" / run.data.tags["model_key"] / "retrieval" / "saved_model.pb").exists()
    # lineage: the validated snapshot is the run's dataset input (the registered versions' run)
    inputs = {i.dataset.name: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"synthetic-interactions", "synthetic-items"}
    snapshot = workspace / "snapshots" / f"run_date={RUN_DATE}"
    assert json.loads(inputs["synthetic-interactions"].source)["uri"] == str(snapshot / "interactions.parquet")
    interactions = pl.read_parquet(snapshot / "interactions.parquet")
    assert json.loads(inputs["synthetic-interactions"].profile)["num_rows"] == interactions.height
    assert "user_id" in inputs["synthetic-interactions"].schema
    assert summary["lists_compared_with"] is None and summary["lists_short_lists"] == 0  # the first night
    assert run.data.metrics["lists_coverage"] == summary["lists_coverage"] > 0


def test_the_champion_loads_as_an_mlflow_model_that_answers_with_the_published_lists(nightly_run, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    workspace, _ = nightly_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    model = mlflow.pyfunc.load_model("models:/recflow-retrieval@champion")
    assert model.metadata.get_input_schema().input_names() == ["user_id", "history"]
    table = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    users = table["user_id"].unique().sort().head(3).to_list()
    answered = pl.from_pandas(model.predict(pd.DataFrame({"user_id": users[::-1]})))
    assert answered["user_id"].unique(maintain_order=True).to_list() == users[::-1]  # in the order asked
    published = table.filter(pl.col("user_id").is_in(users)).sort("user_id", "rank")
    answered = answered.sort("user_id", "rank")
    assert answered.select("user_id", "rank", "item_id", "reason").equals(
        published.select("user_id", "rank", "item_id", "reason"))
    assert (answered["score"] - published["score"]).abs().max() < 1e-5
    # someone the night never saw, from a history of three items: a list of k others
    history = table["item_id"].unique().sort().head(3).to_list()
    fresh = model.predict(pd.DataFrame({"user_id": ["someone-new"], "history": [history]}), params={"k": 4})
    assert fresh["rank"].tolist() == [1, 2, 3, 4] and not set(history) & set(fresh["item_id"])
    assert set(fresh["because_item_id"]) <= set(history)


def test_every_recommendation_is_explained_by_the_most_similar_item_of_the_users_recent_history(nightly_run):
    import numpy as np

    from schemas.tables import ModelDir
    from tasks.features import load_features, user_histories
    from tasks.inference import RetrievalBundle

    workspace, summary = nightly_run
    table = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    assert table["because_item_id"].null_count() == 0 and table["reason"].str.starts_with("similar to ").all()
    features = load_features(workspace / "features" / f"run_date={RUN_DATE}")
    models = ModelDir.of(workspace, summary["model_key"])  # the run's own models: tonight's vocabulary
    bundle = RetrievalBundle.load(models)
    unit = bundle.item_embeddings / np.maximum(np.linalg.norm(bundle.item_embeddings, axis=1, keepdims=True), 1e-12)
    recent = user_histories(features.events, features.n_users, bundle.history_length)
    item_idx = dict(zip(features.items["item_id"], features.items["item_idx"]))
    titles = dict(zip(features.items["item_id"], features.items["title"]))
    seen = pl.read_parquet(workspace / "snapshots" / f"run_date={RUN_DATE}" / "interactions.parquet")
    sample = table.join(features.users.select("user_id", "user_idx"), on="user_id").filter(pl.col("user_idx") <= 40)
    assert sample.height == 40 * 10
    for user_id, user_idx, item_id, because, reason in sample.select(
        "user_id", "user_idx", "item_id", "because_item_id", "reason"
    ).iter_rows():
        history = recent[user_idx][recent[user_idx] > 0]
        closeness = unit[history] @ unit[item_idx[item_id]]
        assert item_idx[because] == history[np.argmax(closeness)]  # the strongest by the stated measure
        assert f'"{titles[because]}"' in reason
        assert float(re.search(r"similarity (-?[0-9.]+)\)", reason).group(1)) == pytest.approx(closeness.max(), abs=0.006)
    assert sample.join(seen, left_on=["user_id", "because_item_id"], right_on=["user_id", "item_id"],
                       how="anti").is_empty()  # every explaining item is in the user's history


def test_fallback_lists_and_similar_items_are_published_with_every_run(nightly_run):
    from schemas.tables import FALLBACK, SIMILAR_ITEMS

    workspace, summary = nightly_run
    fallback = pl.read_parquet(workspace / "fallback" / f"run_date={RUN_DATE}" / "*.parquet")
    assert fallback.schema == FALLBACK
    overall = fallback.filter(pl.col("category").is_null())
    assert overall["rank"].to_list() == list(range(1, 11)) and (overall["score"].diff().drop_nulls() <= 0).all()
    assert fallback["category"].n_unique() == SMALL.n_categories + 1  # every category and the overall list
    similar = pl.read_parquet(workspace / "similar_items" / f"run_date={RUN_DATE}" / "*.parquet")
    assert similar.schema == SIMILAR_ITEMS
    assert similar["item_id"].n_unique() == SMALL.n_items and (similar.group_by("item_id").len()["len"] == 10).all()
    assert similar.filter(pl.col("item_id") == pl.col("similar_item_id")).is_empty()
    assert set(similar["mlflow_run_id"]) == {summary["nightly_run_id"]}


def test_retrieval_and_ranking_beat_popularity_on_planted_structure(nightly_run):
    _, summary = nightly_run
    assert summary["ndcg_at_10"] > 1.3 * summary["popularity_ndcg_at_10"]
    assert summary["retrieval_ndcg_at_10"] > summary["popularity_ndcg_at_10"]


def test_the_served_two_tower_model_learned_from_every_event_and_the_evaluated_one_from_fit_alone(nightly_run):
    import numpy as np

    from schemas.tables import ModelDir
    from tasks.features import load_features, user_histories
    from tasks.inference import RetrievalBundle

    workspace, summary = nightly_run
    models = ModelDir.of(workspace, summary["model_key"])
    served, evaluated = RetrievalBundle.load(models), RetrievalBundle.load(models, fit_model=True)
    assert served.history_length == evaluated.history_length
    features = load_features(workspace / "features" / f"run_date={RUN_DATE}")
    late = features.events.filter(pl.col("split") != "fit")
    # the items users picked after the fit split: the served model, which trained on them, ranks
    # them higher as the next item after the history before them than the evaluated one does
    fit = features.events.filter(pl.col("split") == "fit")
    users = np.unique(late["user_idx"].to_numpy())
    first_late = late.group_by("user_idx", maintain_order=True).first().sort("user_idx")
    history = user_histories(fit, features.n_users, served.history_length)[users]

    def rank_of_next(bundle):
        scores = bundle.queries(users.astype(np.int32), history) @ bundle.item_embeddings.T
        picked = scores[np.arange(users.size), first_late["item_idx"].to_numpy()]
        return float(np.mean((scores[:, 1:] > picked[:, None]).sum(1)))

    assert rank_of_next(served) < rank_of_next(evaluated)


def test_validation_failure_stops_the_run_and_keeps_the_earlier_partition(copy_of_run, tmp_path):
    from flows.nightly import nightly
    from tasks.validate import ValidationFailed

    workspace, _, config = copy_of_run
    earlier = workspace / "recommendations" / f"run_date={RUN_DATE}"
    before = _checksums(earlier)
    broken_date = RUN_DATE + dt.timedelta(days=1)
    source = _broken_source(tmp_path)
    with pytest.raises(ValidationFailed, match="expect_column_values_to_be_between"):
        nightly(config(source=str(source), run_date=broken_date))
    assert _checksums(earlier) == before
    assert not (workspace / "recommendations" / f"run_date={broken_date}").exists()
    assert not (workspace / "features" / f"run_date={broken_date}").exists()
    assert (workspace / "quarantine" / f"run_date={broken_date}" / "reasons.json").exists()


def test_cli_reports_broken_input_in_one_line_with_a_nonzero_exit(tmp_path):
    source = _broken_source(tmp_path)
    result = cli("run", "--source", str(source), "--workspace", str(tmp_path / "ws"), "--run-date", "2026-11-21",
                 timeout=400)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("recflow: error: validation failed")
    assert "interactions.csv" in last and "expect_column_values_to_be_between(timestamp)" in last
    assert not (tmp_path / "ws" / "recommendations").exists()


def test_cli_rejects_a_bad_run_date_without_a_traceback(tmp_path):
    result = cli("run", "--run-date", "2026-13-45", "--workspace", str(tmp_path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "recflow: error: --run-date '2026-13-45' is not a date; use YYYY-MM-DD"


def _broken_source(directory: Path) -> Path:
    """A generic-layout dataset with a few events dated after the run date."""
    interactions, items = generate_synthetic(SMALL, RUN_DATE, 7)
    future = int(dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc).timestamp())
    broken = interactions.with_columns(
        pl.when(pl.int_range(pl.len()) < 5).then(future).otherwise(pl.col("timestamp")).alias("timestamp")
    )
    source = directory / "broken"
    source.mkdir()
    broken.drop("event_type", "weight").write_csv(source / "interactions.csv")
    return source


def _checksums(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}



# Models that must lose the gate on any night: an untrained two-tower model as the only
# candidate source (the data has grown since the champion's night, so a normal run may win).
WEAK = {"retrieval": {"max_epochs": 1, "learning_rate": 1e-7}, "candidates": {"two_tower": 20, "covisitation": 0},
        "ranking": {"max_epochs": 1}}


def test_a_weaker_model_is_registered_but_the_champion_scores_tonight(copy_of_run):
    from flows.nightly import nightly

    workspace, first, config = copy_of_run
    next_date = RUN_DATE + dt.timedelta(days=2)
    summary = nightly(config(run_date=next_date, **WEAK))
    assert summary["promoted"] is False
    assert "does not beat champion v1" in summary["champion"]
    client = mlflow_client(workspace)
    assert client.get_model_version_by_alias("recflow-retrieval", "champion").run_id == first["nightly_run_id"]
    loser = client.get_model_version("recflow-retrieval", "2")
    assert loser.run_id == summary["nightly_run_id"]
    assert loser.tags["promoted"] == "false" and loser.tags["champion_decision"] == summary["champion"]
    assert client.get_run(summary["nightly_run_id"]).data.tags["promoted"] == "false"
    partition = workspace / "recommendations" / f"run_date={next_date}"
    table = pl.read_parquet(partition / "*.parquet")
    assert set(table["model_version"]) == {"1"}
    assert table.group_by("user_id").len()["len"].unique().to_list() == [10]
    # one meaning of mlflow_run_id: the scoring model's training run, in the table and the manifest
    manifest = json.loads((partition / "_manifest.json").read_text())
    assert set(table["mlflow_run_id"]) == {manifest["mlflow_run_id"]} == {first["nightly_run_id"]}
    assert manifest["nightly_run_id"] == summary["nightly_run_id"] and manifest["model_version"] == "1"


def test_rerunning_the_evaluation_of_models_that_lost_the_gate_registers_them_once(copy_of_run):
    from flows.nightly import nightly

    workspace, _, config = copy_of_run
    weak = config(run_date=RUN_DATE + dt.timedelta(days=2), **WEAK)
    first, again = nightly(weak), nightly(weak)
    assert first["promoted"] is False and again["promoted"] is False
    assert "train_retrieval" in again["reused_stages"] and again["model_key"] == first["model_key"]
    client = mlflow_client(workspace)
    for name in ("recflow-retrieval", "recflow-ranking"):
        versions = client.search_model_versions(f"name='{name}'")
        assert len(versions) == 2  # the champion's, and the weak models' once
        assert [v.tags["model_key"] for v in versions].count(first["model_key"]) == 1


def test_a_rerun_with_unchanged_input_reuses_every_stage_and_keeps_the_output(copy_of_run):
    from flows.nightly import nightly

    workspace, first, config = copy_of_run
    partition = workspace / "recommendations" / f"run_date={RUN_DATE}"
    before = _checksums(partition)
    again = nightly(config())
    assert again["reused_stages"] == [
        "ingest", "validate", "features", "train_retrieval", "select", "train_ranking", "score", "publish"
    ]
    assert _checksums(partition) == before
    assert again["promoted"] is False and "champion v1 already" in again["champion"]
    client = mlflow_client(workspace)
    run, first_run = client.get_run(again["nightly_run_id"]), client.get_run(first["nightly_run_id"])
    assert run.data.tags["reused_stages"] == "ingest,validate,features,train_retrieval,select,train_ranking,score,publish"
    assert set(first_run.data.metrics) <= set(run.data.metrics)  # the compare view lines the runs up
    assert run.data.metrics["ndcg_at_10"] == first_run.data.metrics["ndcg_at_10"]
    assert len(client.search_model_versions("name='recflow-retrieval'")) == 1  # nothing registered twice
    assert _digests(run) == _digests(first_run)  # identical input, identical dataset digests


def _digests(run) -> dict[str, str]:
    return {i.dataset.name: i.dataset.digest for i in run.inputs.dataset_inputs}


def test_a_fault_in_scoring_fails_the_list_health_gate_and_the_next_normal_night_publishes(copy_of_run, monkeypatch):
    import tasks.score
    from flows.nightly import nightly
    from tasks.health import ListsUnhealthy

    workspace, first, config = copy_of_run
    before = _checksums(workspace / "recommendations" / f"run_date={RUN_DATE}")
    night = RUN_DATE + dt.timedelta(days=1)
    real = tasks.score.recommend_blocks

    def same_for_everyone(models, features, users, *args, **kwargs):
        first_list = None
        for recs in real(models, features, users, *args, **kwargs):
            if first_list is None:
                first_list = recs.filter(pl.col("user_idx") == recs["user_idx"].min()).drop("user_idx")
            yield recs.select(pl.col("user_idx").unique(maintain_order=True)).join(first_list, how="cross")

    def half_dropped(models, features, users, *args, **kwargs):
        for recs in real(models, features, users, *args, **kwargs):
            yield recs.filter(pl.col("user_idx") % 2 == 0)

    for fault, figure in ((same_for_everyone, "coverage_change"), (half_dropped, "short_lists")):
        monkeypatch.setattr(tasks.score, "recommend_blocks", fault)
        with pytest.raises(ListsUnhealthy) as error:
            nightly(config(run_date=night))
        message = str(error.value)
        assert message.startswith("list health: ")  # the one line names every breached figure
        assert f"{figure} " in message and f"monitoring.{'min' if 'coverage' in figure else 'max'}_{figure}" in message
        assert message.endswith(f"nothing published, {RUN_DATE} stays current") and "\n" not in message
        assert not (workspace / "recommendations" / f"run_date={night}").exists()
        assert _checksums(workspace / "recommendations" / f"run_date={RUN_DATE}") == before
    monkeypatch.setattr(tasks.score, "recommend_blocks", real)
    client = mlflow_client(workspace)
    failed = client.search_runs([client.get_experiment_by_name("recflow-copy").experiment_id],
                                filter_string="attributes.status = 'FAILED'")
    assert len(failed) == 2 and all(r.data.metrics["lists_short_lists"] >= 0 for r in failed)
    assert max(r.data.metrics["lists_short_lists"] for r in failed) >= 0.4  # the figures of a breach are logged
    summary = nightly(config(run_date=night))
    assert summary["lists_compared_with"] == str(RUN_DATE) and summary["lists_new_lists"] < 0.8
    assert (workspace / "recommendations" / f"run_date={night}").exists()
    assert _digests(client.get_run(summary["nightly_run_id"])) != _digests(client.get_run(first["nightly_run_id"]))


def test_a_changed_setting_reruns_only_the_stages_that_depend_on_it(copy_of_run):
    from flows.nightly import nightly

    workspace, _, config = copy_of_run
    changed = nightly(config(top_k=5))
    assert changed["reused_stages"] == ["ingest", "validate", "features", "train_retrieval", "select", "train_ranking"]
    table = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    assert table.group_by("user_id").len()["len"].unique().to_list() == [5]


def test_cli_prints_a_users_list_with_titles_and_the_last_runs_side_by_side(nightly_run):
    workspace, summary = nightly_run
    table = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    user = table["user_id"][0]
    items = pl.read_parquet(workspace / "snapshots" / f"run_date={RUN_DATE}" / "items.parquet")
    top = table.filter((pl.col("user_id") == user) & (pl.col("rank") == 1))["item_id"][0]
    recs = cli("recs", user, "--run-date", str(RUN_DATE), "--workspace", str(workspace))
    assert recs.returncode == 0, recs.stderr
    first_row = next(line for line in recs.stdout.splitlines() if line.startswith("│ 1 "))
    assert top in first_row and items.filter(pl.col("item_id") == top)["title"][0] in first_row
    missing = cli("recs", "no-such-user", "--workspace", str(workspace))  # the latest run date
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"recflow: error: user 'no-such-user' has no list on {RUN_DATE}: not in that run's input"
    runs = cli("runs", "--last", "3", "--workspace", str(workspace))
    assert runs.returncode == 0, runs.stderr
    assert f"{RUN_DATE} ({summary['nightly_run_id'][:6]})" in runs.stdout  # the one run so far
    assert "ndcg@10" in runs.stdout and "champion ndcg@10" in runs.stdout and "short lists" in runs.stdout


def test_commands_that_only_read_import_no_tensorflow_great_expectations_prefect_or_mlflow(nightly_run):
    workspace, _ = nightly_run
    user = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")["user_id"][0]
    where = ["--workspace", str(workspace)]
    for command in (["recs", user, *where], ["explain", user, *where], ["runs", "--last", "5", *where], ["--help"]):
        result = cli(*command, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
        assert result.returncode == 0, result.stderr[-2000:]
        imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
        assert "polars" in imported or command == ["--help"]  # the import log was read
        assert not imported & {"tensorflow", "great_expectations", "prefect", "mlflow"}, command


def test_warm_start_copies_the_champions_embeddings_through_the_vocabularies(nightly_run, copy_of_run, tmp_path):
    import numpy as np
    from mlflow.tracking import MlflowClient

    from flows.nightly import nightly
    from schemas.config import FeatureConfig
    from schemas.tables import Snapshot
    from tasks import towers
    from tasks.features import load_features
    from tasks.featurize import build_features
    from tasks.retrieval import warm_start
    from tasks.tfenv import tf
    from tasks.tracking import champion_models
    from tests.conftest import make_run

    workspace, _ = nightly_run
    champion = champion_models(workspace)
    published = workspace / "snapshots" / f"run_date={RUN_DATE}"
    interactions, items = (pl.read_parquet(published / f"{table}.parquet") for table in ("interactions", "items"))
    dropped = items["item_id"].sort().head(10).implode()  # shifts every later item's index
    source = tmp_path / "snapshot"
    source.mkdir()
    interactions.filter(~pl.col("item_id").is_in(dropped)).write_parquet(source / "interactions.parquet")
    items.filter(~pl.col("item_id").is_in(dropped)).write_parquet(source / "items.parquet")
    snapshot = Snapshot(path=source, source="test", n_interactions=0, n_users=0, n_items=0, has_items=True,
                        data_hash="", origin={})
    feature_set = build_features(make_run(tmp_path / "ws"), snapshot)
    features = load_features(feature_set.path)
    model = towers.TwoTower(features, FeatureConfig().history_length, RetrievalConfig())
    copied = warm_start(model, champion, features)

    old = tf.saved_model.load(str(champion.retrieval_path)).query_model
    old_items = pl.read_parquet(champion.items)
    item = features.items.row(0, named=True)
    old_idx = old_items.filter(pl.col("item_id") == item["item_id"])["item_idx"][0]
    assert old_idx != item["item_idx"]
    new_row = model.query_model.items.ids.embeddings.numpy()[item["item_idx"]]
    np.testing.assert_array_equal(new_row, old.items.ids.embeddings.numpy()[old_idx])
    np.testing.assert_array_equal(model.query_model.project.kernel.numpy(), old.project.kernel.numpy())
    assert copied >= 6  # the item id table, distance biases, attention and projection weights, self-attention block

    copy, _, config = copy_of_run
    next_day = RUN_DATE + dt.timedelta(days=1)  # the synthetic source has grown by a day
    warm = nightly(config(run_date=next_day, retrieval={"max_epochs": 2, "batch_size": 512, "warm_start": True}))
    uri = f"sqlite:///{copy / 'mlflow.db'}"
    run = MlflowClient(tracking_uri=uri).get_run(warm["nightly_run_id"])
    assert run.data.tags["warm_start_from"] == champion.name
    # consecutive nights differ: new events, and new lists
    first, second = (pl.read_parquet(copy / "snapshots" / f"run_date={day}" / "interactions.parquet")
                     for day in (RUN_DATE, next_day))
    assert not second.join(first, on=["user_id", "item_id", "timestamp"], how="anti").is_empty()
    lists = [pl.read_parquet(copy / "recommendations" / f"run_date={day}" / "*.parquet").select("user_id", "rank", "item_id")
             .sort("user_id", "rank") for day in (RUN_DATE, next_day)]
    assert not lists[0].equals(lists[1])


def test_diversity_reranking_spreads_lists_over_more_categories_from_the_same_models(copy_of_run):
    from flows.nightly import nightly

    workspace, _, config = copy_of_run
    plain, diverse = (nightly(config(lists={"diversity": weight})) for weight in (0.0, 0.6))
    assert {"train_retrieval", "train_ranking"} <= set(diverse["reused_stages"])  # only the lists change
    client = mlflow_client(workspace)
    before, after = (client.get_run(s["nightly_run_id"]).data.metrics for s in (plain, diverse))
    assert after["diversity_at_10"] > before["diversity_at_10"]
    table = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    assert (table.group_by("user_id").agg((pl.col("score").sort_by("rank").diff().drop_nulls() <= 0).all())["score"]).all()
    assert table.group_by("user_id").len()["len"].unique().to_list() == [10]


def test_every_list_the_night_serves_holds_only_what_the_business_rules_allow(copy_of_run, monkeypatch):
    """Rules that bite: the items listed most by the shared run become unavailable (switched
    off, discontinued, launching tomorrow, excluded for everyone), and twenty users may no
    longer see their first item; lists are capped at 3 per category, scored in 2 shards."""
    import mlflow.pyfunc
    import pandas as pd

    workspace, _, config = copy_of_run
    before = pl.read_parquet(workspace / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    interactions, items = generate_synthetic(SMALL, RUN_DATE, 42)
    most_listed = before.group_by("item_id").len().sort("len", "item_id", descending=[True, False])["item_id"]
    off, ended, later, everyone = most_listed[0:3], most_listed[3:6], most_listed[6:9], most_listed[9]
    moment = int(dt.datetime.combine(RUN_DATE + dt.timedelta(days=1), dt.time(), dt.timezone.utc).timestamp())
    items = items.with_columns(
        available=~pl.col("item_id").is_in(off.implode()),
        available_until=pl.when(pl.col("item_id").is_in(ended.implode())).then(moment)
        .otherwise(pl.col("available_until")),
        available_from=pl.when(pl.col("item_id").is_in(later.implode())).then(moment + 86_400)
        .otherwise(pl.col("available_from")),
    )
    firsts = before.filter((pl.col("rank") == 1) & ~pl.col("item_id").is_in(most_listed.head(10).implode())).head(20)
    # Someone with no events at all (an offline customer) who returned the item a new user with
    # this history is offered first.
    history = list(before["item_id"].unique().sort().head(3))
    with monkeypatch.context() as registry:  # only while asking: the run below tracks as recflow does
        registry.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
        offered = mlflow.pyfunc.load_model("models:/recflow-retrieval@champion").predict(
            pd.DataFrame({"user_id": ["someone-new"], "history": [history]}))
    returned = next(item for item in offered["item_id"] if item not in set(most_listed.head(10)))
    excluded = pl.DataFrame({"user_id": [*firsts["user_id"], None, "offline-customer"],
                             "item_id": [*firsts["item_id"], everyone, returned]})
    source = workspace.parent / "source"
    source.mkdir()
    interactions.write_parquet(source / "interactions.parquet")
    items.write_parquet(source / "items.parquet")
    excluded.write_csv(source / "exclusions.csv")
    from flows.nightly import nightly

    nightly(config(source=str(source), shards=2, lists={"max_per_category": 3}))

    unservable = set(items.filter(~pl.col("available") | (pl.col("available_from") > moment)
                                  | (pl.col("available_until") <= moment))["item_id"]) | {everyone}
    assert set(off) | set(ended) | set(later) <= unservable
    categories = items.select("item_id", pl.col("categories").alias("category")).explode("category")

    def obeys_the_rules(lists: pl.DataFrame, k: int) -> None:
        assert not set(lists["item_id"]) & unservable
        assert lists.join(firsts.select("user_id", "item_id"), on=["user_id", "item_id"]).is_empty()
        assert lists.join(categories, on="item_id").group_by("user_id", "category").len()["len"].max() <= 3
        per_user = lists.group_by("user_id").agg(pl.len(), pl.col("item_id").n_unique().alias("distinct"))
        assert (per_user["len"] == k).all() and (per_user["distinct"] == k).all()

    partition = lambda table: pl.read_parquet(workspace / table / f"run_date={RUN_DATE}" / "*.parquet")  # noqa: E731
    published = partition("recommendations")
    obeys_the_rules(published, 10)
    assert not set(partition("fallback")["item_id"]) & unservable
    assert not set(partition("similar_items")["similar_item_id"]) & unservable
    manifest = json.loads((workspace / "recommendations" / f"run_date={RUN_DATE}" / "_manifest.json").read_text())
    assert manifest["users"] == published["user_id"].n_unique() and "users_filled" in manifest

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workspace / 'mlflow.db'}")
    tonight = max(int(v.version) for v in mlflow_client(workspace).search_model_versions("name='recflow-retrieval'"))
    model = mlflow.pyfunc.load_model(f"models:/recflow-retrieval/{tonight}")  # the version logged with tonight's rules
    users = firsts["user_id"].to_list()
    obeys_the_rules(pl.from_pandas(model.predict(pd.DataFrame({"user_id": users}))), 10)
    histories = [list(off) + list(ended)] * len(users)  # a history request keeps the user's exclusions
    obeys_the_rules(pl.from_pandas(model.predict(pd.DataFrame({"user_id": users, "history": histories}),
                                                 params={"k": 5})), 5)
    answers = pl.from_pandas(model.predict(pd.DataFrame({"user_id": ["someone-new", "offline-customer"],
                                                         "history": [history, history]})))
    assert returned in set(answers.filter(pl.col("user_id") == "someone-new")["item_id"])
    assert returned not in set(answers.filter(pl.col("user_id") == "offline-customer")["item_id"])
