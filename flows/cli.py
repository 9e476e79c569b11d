"""The `recflow` command: a thin layer over flows/ and tasks/.

User errors (bad paths, dates, config or input) end with one clear line on stderr and a
non-zero exit; everything else is the pipeline's own logging.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="recflow: a nightly recommendation pipeline (Prefect + GE + polars + TFRS + MLflow).",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def main() -> None:
    """Run `recflow COMMAND --help` for each command's options."""


@app.command()
def run(
    source: Annotated[Optional[str], typer.Option(help="'synthetic', a data directory, or 'movielens:<name>'")] = None,
    run_date: Annotated[Optional[str], typer.Option(help="logical date YYYY-MM-DD (default: today, UTC)")] = None,
    workspace: Annotated[Optional[Path], typer.Option(help="directory for everything a run writes")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="items per user in the output table")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML or JSON file of PipelineConfig fields")] = None,
) -> None:
    """Run the nightly flow once and print where the lists went."""
    overrides = {"source": source, "run_date": _date(run_date), "workspace": str(workspace) if workspace else None,
                 "top_k": top_k}
    pipeline_config = _config(config, {k: v for k, v in overrides.items() if v is not None})
    _check_workspace(pipeline_config.workspace_path())
    from flows.nightly import nightly
    from tasks.workspace import RecflowError

    _quiet_user_errors(RecflowError)
    try:
        summary = nightly(pipeline_config)
    except RecflowError as error:
        logging.getLogger("prefect").setLevel(logging.WARNING)  # keep our line last
        _fail(str(error))
    typer.echo(json.dumps(summary, indent=2))


@app.command()
def bench(
    dataset: Annotated[str, typer.Argument(help="a dataset directory, or 'synthetic'")],
    out: Annotated[Path, typer.Option(help="where to write the JSON report")] = Path("bench/results/quality.json"),
) -> None:
    """Score `recflow run` against classical baselines under DESIGN.md's quality protocol."""
    script = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    if not script.exists():
        _fail(f"{script} not found; the benchmark runs from a source checkout")
    raise typer.Exit(subprocess.call([sys.executable, str(script), dataset, "--out", str(out)]))


def _date(value: str | None) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        _fail(f"--run-date {value!r} is not a date; use YYYY-MM-DD")


def _config(path: Path | None, overrides: dict):
    from pydantic import ValidationError

    from schemas.config import PipelineConfig

    values: dict = {}
    if path is not None:
        if not path.is_file():
            _fail(f"--config {path}: no such file")
        text = path.read_text()
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                values = yaml.safe_load(text) or {}
            else:
                values = json.loads(text)
        except ValueError as error:
            _fail(f"--config {path}: not valid {path.suffix[1:] or 'JSON'}: {error}")
    try:
        return PipelineConfig.model_validate(values | overrides)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        _fail(f"config field {where!r}: {problem['msg']}")


def _check_workspace(workspace: Path) -> None:
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        probe = workspace / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        _fail(f"workspace {workspace} is not writable: {error.strerror or error}")


def _quiet_user_errors(user_error: type[Exception]) -> None:
    """Prefect logs failed runs with a traceback; for errors a user caused, the message is enough."""

    def drop_traceback(record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], user_error):
            record.exc_info, record.exc_text = None, None
        return True

    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(drop_traceback)


def _fail(message: str) -> None:
    typer.echo(f"recflow: error: {message}", err=True)
    raise typer.Exit(code=2 if message.startswith("--") else 1)


if __name__ == "__main__":
    sys.exit(app())
