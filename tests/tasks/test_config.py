"""The config contract of a deployment: a run's partial config is laid over the
deployment's, never in place of it. And the config documents itself: every field has a
description, and docs/configuration.md is written from them."""

from __future__ import annotations

import yaml
from pydantic import BaseModel

from schemas import reference
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



def _sections() -> dict[str, type[BaseModel]]:
    return {name: field.annotation for name, field in PipelineConfig.model_fields.items()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)}


def test_every_config_field_has_a_description_and_every_section_a_docstring():
    models = [PipelineConfig, *_sections().values()]
    undocumented = [model.__name__ for model in models if not (model.__doc__ or "").strip()]
    undescribed = [f"{model.__name__}.{name}" for model in models
                   for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert len(models) == 10 and undocumented == [] and undescribed == []


def test_configuration_reference_is_in_sync_with_the_config_model():
    assert reference.REFERENCE.read_text() == reference.render(), (
        "docs/configuration.md differs from schemas/config.py: run `make docs` and commit it")


def test_the_reference_has_a_row_per_field_and_its_example_is_a_valid_config():
    text = reference.render()
    names = [*PipelineConfig.model_fields] + [f"{section}.{name}" for section, model in _sections().items()
                                              for name in model.model_fields]
    assert [name for name in names if f"| `{name}` |" not in text] == []
    example = yaml.safe_load(reference.EXAMPLE)
    assert PipelineConfig.model_validate(example).retrieval.max_epochs == example["retrieval"]["max_epochs"]
