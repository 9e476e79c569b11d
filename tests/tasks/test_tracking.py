"""The registry: each models directory is registered once, whoever asks how often."""

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
