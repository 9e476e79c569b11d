"""The registry: each models directory is registered once, whoever asks how often; and
`recflow runs` reads the store as MLflow does."""

from __future__ import annotations

from tasks import tracking


def test_registering_the_same_model_key_again_finds_the_version_already_registered(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = tracking.client(tmp_path)
    experiment = client.create_experiment("recflow", artifact_location=(tmp_path / "mlartifacts").as_uri())
    first_run, retry_run = (client.create_run(experiment).info.run_id for _ in range(2))

    first = tracking.register(tmp_path, first_run, "models-a")
    retried = tracking.register(tmp_path, retry_run, "models-a")  # a rerun or a retried evaluate
    other = tracking.register(tmp_path, retry_run, "models-b")

    assert first == retried == "1" and other == "2"
    for name in (tracking.RETRIEVAL_MODEL, tracking.RANKING_MODEL):
        versions = client.search_model_versions(f"name='{name}'")
        assert sorted((str(v.version), v.tags["model_key"], v.run_id) for v in versions) == [
            ("1", "models-a", first_run), ("2", "models-b", retry_run)
        ]


def test_recflow_runs_reads_the_sqlite_store_as_mlflow_does(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    client = tracking.client(tmp_path)
    experiment = client.create_experiment("recflow", artifact_location=(tmp_path / "mlartifacts").as_uri())
    for night in range(3):
        run_id = client.create_run(experiment, tags={"run_date": f"2026-11-2{night}"}).info.run_id
        client.log_metric(run_id, "ndcg_at_10", night / 4, step=0)
        client.log_metric(run_id, "ndcg_at_10", night / 4 + 0.125, step=1)  # the latest value counts
        client.set_terminated(run_id, "FINISHED" if night else "FAILED")
    client.delete_run(client.create_run(experiment).info.run_id)  # deleted runs are not listed
    uri = tracking.tracking_uri(tmp_path)

    direct = tracking.stored_runs(uri, "recflow", 2)
    assert direct == tracking._client_runs(uri, "recflow", 2)
    assert [(r["tags"]["run_date"], r["status"], r["metrics"]["ndcg_at_10"]) for r in direct] == [
        ("2026-11-22", "FINISHED", 0.625), ("2026-11-21", "FINISHED", 0.375)]
    assert tracking.stored_runs(uri, "another", 2) is None
    monkeypatch.chdir(tmp_path)  # MLFLOW_TRACKING_URI=sqlite:///mlflow.db: relative to the working directory
    assert tracking.stored_runs("sqlite:///mlflow.db", "recflow", 2) == direct
    assert tracking.stored_runs(tracking.tracking_uri(tmp_path / "empty"), "recflow", 2) is None
