"""The config contract of a deployment: a run's partial config is laid over the
deployment's, never in place of it."""

from __future__ import annotations

from schemas.config import PipelineConfig


def test_a_partial_config_keeps_the_deployments_other_settings_at_any_depth():
    deployment = PipelineConfig(workspace="/srv/recflow", source="movielens:ml-latest-small", top_k=50,
                                retrieval={"max_epochs": 3, "batch_size": 256}).model_dump(mode="json")
    asked = PipelineConfig.model_validate({"top_k": 7, "retrieval": {"max_epochs": 1}})
    merged = asked.over(deployment)
    assert (merged.workspace, merged.source, merged.top_k) == ("/srv/recflow", "movielens:ml-latest-small", 7)
    assert (merged.retrieval.max_epochs, merged.retrieval.batch_size) == (1, 256)


def test_a_full_config_from_the_ui_form_wins_whole_and_no_deployment_changes_nothing():
    form = PipelineConfig(top_k=9).model_dump(mode="json")  # the prefilled form sends every field
    assert PipelineConfig.model_validate(form).over({"workspace": "/srv/recflow", "top_k": 50}) == PipelineConfig(
        top_k=9)
    assert PipelineConfig(top_k=3).over({}) == PipelineConfig(top_k=3)
