"""The configuration reference, docs/configuration.md, written from `PipelineConfig`.

The config model is the one source of every field's type, default, bounds and
description; this module renders it as markdown, so the reference cannot drift from the
code. `python -m schemas.reference` (`make docs`) writes the file; with `--check` it only
says whether the committed file is out of date (a test checks the same).
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
from pathlib import Path
from typing import Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from schemas.config import PipelineConfig

REFERENCE = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

INTRO = """\
# Configuration

Every setting of a nightly run is a field of one model, `PipelineConfig` (schemas/config.py).
This page is generated from it by `python -m schemas.reference` (`make docs`): never edit it
by hand, and a test fails when it differs from the model. A config is given to
`recflow run --config FILE` (and to `backfill` and `serve`) as YAML or JSON; flags such as
`--top-k` override the file, and every field left out keeps its default. The Prefect
deployment's parameters form shows the same fields with these descriptions; a run that gives
only some fields (e.g. `prefect deployment run ... --param config='{"top_k": 7}'`) has them
laid over the deployment's config, so everything else keeps the deployment's values.
"""

EXAMPLE = """\
source: movielens:ml-latest-small
workspace: /srv/recflow
top_k: 50
retrieval:
  max_epochs: 10
lists:
  diversity: 0.2
privacy:
  retention_days: 90
"""

HEADER = "| field | type | default | bounds | description |\n|---|---|---|---|---|"


def render() -> str:
    """The markdown of docs/configuration.md."""
    fields = PipelineConfig.model_fields
    sections = {name: field.annotation for name, field in fields.items() if _is_section(field.annotation)}
    parts = [INTRO, f"```yaml\n{EXAMPLE}```", _section("Top level", PipelineConfig, "", sections)]
    parts += [_section(name, model, f"{name}.", {}) for name, model in sections.items()]
    return "\n\n".join(part.strip("\n") for part in parts) + "\n"


def _section(title: str, model: type[BaseModel], prefix: str, sections: dict[str, type[BaseModel]]) -> str:
    """One `##` heading: the model's docstring, then a row per field (a nested section's row
    links to its own heading)."""
    rows = []
    for name, field in model.model_fields.items():
        if name in sections:
            row = [f"`{name}`", f"[{field.annotation.__name__}](#{name})", "", "", field.description or ""]
        else:
            row = [f"`{prefix}{name}`", f"`{_type(field.annotation)}`", f"`{_default(field)}`", _bounds(field),
                   field.description or ""]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |")
    return f"## {title}\n\n{inspect.cleandoc(model.__doc__ or '')}\n\n{HEADER}\n" + "\n".join(rows)


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _type(annotation: object) -> str:
    """A type as a reader writes it: `int`, `list[float]`, `str | None`, `"a" | "b"`."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(arg) for arg in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type(arg) for arg in args)
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type(arg) for arg in args)}]"
    return "None" if annotation is type(None) else annotation.__name__


def _default(field: FieldInfo) -> str:
    return _literal(field.get_default(call_default_factory=True))


def _literal(value: object) -> str:
    """A value as YAML would hold it: null, true, 0.003, "synthetic", [0.5, 0.7]."""
    if value is None or isinstance(value, (bool, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_literal(item) for item in value) + "]"
    return str(value)


def _bounds(field: FieldInfo) -> str:
    """The field's constraints, e.g. `>= 1`, `> 0, < 1`, `multiple of 2`, `at least 1 value`."""
    words = {at.Ge: (">=", "ge"), at.Gt: (">", "gt"), at.Le: ("<=", "le"), at.Lt: ("<", "lt")}
    bounds = []
    for constraint in field.metadata:
        if type(constraint) in words:
            sign, attribute = words[type(constraint)]
            bounds.append(f"{sign} {getattr(constraint, attribute)}")
        elif isinstance(constraint, at.MultipleOf):
            bounds.append(f"multiple of {constraint.multiple_of}")
        elif isinstance(constraint, at.MinLen):
            bounds.append(f"at least {constraint.min_length} value{'s' if constraint.min_length != 1 else ''}")
    return ", ".join(bounds)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/configuration.md from PipelineConfig.")
    parser.add_argument("--check", action="store_true", help="only fail when the committed file is out of date")
    check = parser.parse_args(argv).check
    text = render()
    if not check:
        REFERENCE.write_text(text)
        return 0
    if REFERENCE.is_file() and REFERENCE.read_text() == text:
        return 0
    print(f"{REFERENCE} differs from schemas/config.py: run `make docs` (python -m schemas.reference)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
