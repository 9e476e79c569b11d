"""The `recflow` command: a thin layer over flows/ and tasks/.

User errors (bad paths, dates, config or input) end with one clear line on stderr and a
non-zero exit; everything else is the pipeline's own logging.
"""

from __future__ import annotations

import datetime as dt
import gc
import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="recflow: a nightly recommendation pipeline (Prefect + GE + polars + TFRS + MLflow).",
                  no_args_is_help=True, add_completion=False)


@app.callback()
def commands() -> None:
    """Run `recflow COMMAND --help` for each command's options."""


Source = Annotated[Optional[str], typer.Option(help="'synthetic', a data directory, or 'movielens:<name>'")]
Workspace = Annotated[Optional[Path], typer.Option(help="directory for everything a run writes [default: ./workspace]")]
KeyFile = Annotated[Optional[Path], typer.Option(
    help="the run's privacy.key_file, when user ids were pseudonymised: the id is hashed with it to find the list")]
TopK = Annotated[Optional[int], typer.Option(help="items per user in the output table [default: 20]")]
ConfigFile = Annotated[Optional[Path], typer.Option("--config", help="YAML or JSON file of PipelineConfig fields")]


@app.command()
def run(
    source: Source = None,
    run_date: Annotated[Optional[str], typer.Option(help="logical date YYYY-MM-DD (default: today, UTC)")] = None,
    workspace: Workspace = None,
    top_k: TopK = None,
    config: ConfigFile = None,
    shards: Annotated[Optional[int], typer.Option(help="scoring shards (user ranges) [default: 1]")] = None,
    task_runner: Annotated[str, typer.Option(
        help="where scoring shards run: 'threads' (this process) or 'dask' (a local Dask cluster of one worker "
        "per shard, or the scheduler at --dask-address)")] = "threads",
    dask_address: Annotated[Optional[str], typer.Option(
        help="Dask scheduler, e.g. tcp://10.0.0.5:8786 (implies --task-runner dask; needs PREFECT_API_URL)")] = None,
) -> None:
    """Run the nightly flow once and print where the lists went."""
    if task_runner not in ("threads", "dask"):
        _fail(f"--task-runner {task_runner!r}: use threads or dask")
    if dask_address:
        task_runner = "dask"
        if not os.environ.get("PREFECT_API_URL"):
            _fail("--dask-address: remote Dask workers report to the Prefect API; set PREFECT_API_URL to a server "
                  "they can reach (`recflow stack up --host 0.0.0.0`)")
    pipeline_config = _pipeline_config(config, source=source, run_date=_date(run_date, "--run-date"),
                                       workspace=workspace, top_k=top_k, shards=shards)
    server = _start_prefect_server()
    from flows.nightly import nightly

    flow = nightly
    if task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        runner = (DaskTaskRunner(address=dask_address) if dask_address else
                  DaskTaskRunner(cluster_kwargs={"n_workers": pipeline_config.shards, "threads_per_worker": 1}))
        flow = nightly.with_options(task_runner=runner)
    typer.echo(json.dumps(_user_errors_in_one_line(server, flow, pipeline_config), indent=2))


@app.command()
def backfill(
    start: Annotated[str, typer.Option(help="first run date, YYYY-MM-DD")],
    end: Annotated[str, typer.Option(help="last run date, YYYY-MM-DD (inclusive)")],
    source: Source = None,
    workspace: Workspace = None,
    top_k: TopK = None,
    config: ConfigFile = None,
) -> None:
    """Run past dates in order; each sees only interactions up to its own date."""
    first, last = _date(start, "--start"), _date(end, "--end")
    if last < first:
        _fail(f"--end {end} is before --start {start}")
    pipeline_config = _pipeline_config(config, source=source, workspace=workspace, top_k=top_k)
    server = _start_prefect_server()
    from flows.nightly import backfill as backfill_flow

    summaries = _user_errors_in_one_line(server, backfill_flow, first, last, pipeline_config)
    typer.echo(json.dumps([{k: s[k] for k in ("run_date", "nightly_run_id", "output", "rows")} for s in summaries],
                          indent=2))


@app.command()
def serve(
    cron: Annotated[str, typer.Option(help="when the nightly run starts")] = "0 2 * * *",
    timezone: Annotated[str, typer.Option(help="IANA time zone of the cron schedule")] = "UTC",
    name: Annotated[str, typer.Option(help="deployment name")] = "nightly",
    source: Source = None,
    workspace: Workspace = None,
    top_k: TopK = None,
    config: ConfigFile = None,
) -> None:
    """Serve the nightly flow (on a schedule) and the backfill flow as Prefect deployments.

    Needs a Prefect server (PREFECT_API_URL, e.g. from `recflow stack up`); runs start in
    this process, whether scheduled or triggered from the UI with their parameters form.
    """
    pipeline_config = _pipeline_config(config, source=source, workspace=workspace, top_k=top_k)
    _check_prefect()
    from flows.stack import serve_deployments

    try:
        serve_deployments(pipeline_config, name, cron, timezone)
    except ValueError as error:
        _fail(str(error))


@app.command()
def runs(
    last: Annotated[int, typer.Option(help="how many runs")] = 5,
    workspace: Workspace = None,
    experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "recflow",
) -> None:
    """Print the last runs side by side: dates, decisions, metrics and timings from MLflow."""
    import polars as pl

    from tasks.tracking import recent_runs, runs_link

    table = recent_runs(_workspace(workspace), experiment, last)
    if table is None:
        _fail(f"no MLflow experiment {experiment!r} yet; run `recflow run` first")
    decisions = table.filter(pl.col("") == "champion decision")
    _print_table(table.filter(pl.col("") != "champion decision"))
    for label in table.columns[1:]:
        typer.echo(f"{label}: {decisions[label][0] or '-'}")
    if len(table.columns) > 1:
        link = runs_link(_workspace(workspace), table.filter(pl.col("") == "run id")[table.columns[1]][0])
        if link.startswith("http"):
            typer.echo(f"in MLflow: {link}")


@app.command()
def recs(
    user_id: Annotated[str, typer.Argument(help="a user id as in the input")],
    run_date: Annotated[Optional[str], typer.Option(help="YYYY-MM-DD (default: the latest run)")] = None,
    workspace: Workspace = None,
    key_file: KeyFile = None,
) -> None:
    """Print one user's list with item titles."""
    _print_table(_user_list(user_id, run_date, workspace, key_file).select(
        "rank", "item_id", "title", "score", "run_date", "model_version"))


@app.command()
def explain(
    user_id: Annotated[str, typer.Argument(help="a user id as in the input")],
    run_date: Annotated[Optional[str], typer.Option(help="YYYY-MM-DD (default: the latest run)")] = None,
    workspace: Workspace = None,
    key_file: KeyFile = None,
) -> None:
    """Print one user's list with the reason for each item: the item of their recent history
    most like it (cosine of the candidate tower's embeddings)."""
    _print_table(_user_list(user_id, run_date, workspace, key_file).select(
        "rank", "item_id", "title", "reason", "because_item_id", "because_title"))


def _user_list(user_id: str, run_date: str | None, workspace: Path | None, key_file: Path | None):
    from tasks.privacy import served_id
    from tasks.workspace import RecflowError, published_list

    try:
        return published_list(_workspace(workspace), served_id(user_id, key_file), _date(run_date, "--run-date"))
    except RecflowError as error:
        _fail(str(error))


@app.command()
def stack(
    action: Annotated[str, typer.Argument(help="up, down or status")],
    directory: Annotated[Path, typer.Option("--dir", help="where the servers keep their state and logs")] = Path(
        "workspace/.stack"),
    host: Annotated[str, typer.Option(help="address the servers bind to")] = "127.0.0.1",
    prefect_port: Annotated[int, typer.Option(help="Prefect server port")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="MLflow tracking server port")] = 5000,
    backend: Annotated[str, typer.Option(help="sqlite: two servers on sqlite; postgres: PostgreSQL, both servers "
                                         "on it, the work pool and deployments of infra/prefect.yaml and a worker")
                       ] = "sqlite",
    postgres_port: Annotated[int, typer.Option(help="PostgreSQL port (postgres backend)")] = 5432,
) -> None:
    """Start, stop or check a local stack: Prefect and MLflow servers (sqlite), or the
    production topology on PostgreSQL with a worker (`--backend postgres`). `up` starts
    only what is not running, so it also brings back a server that died."""
    from flows import stack as local_stack

    if action not in ("up", "down", "status"):
        _fail(f"stack action {action!r}: use up, down or status")
    try:
        if action == "up":
            urls = local_stack.up(directory.resolve(), host, prefect_port, mlflow_port, backend, postgres_port)
            typer.echo(f"stack is up (started: {urls['started']}; alerts: {urls['alerts']}); point recflow at it with:")
            typer.echo(f"  export PREFECT_API_URL={urls['prefect']} MLFLOW_TRACKING_URI={urls['mlflow']}")
        elif action == "down":
            typer.echo(local_stack.down(directory.resolve()))
        else:
            status = local_stack.status(directory.resolve())
            typer.echo(json.dumps(status, indent=2))
            raise typer.Exit(0 if status and all(s["healthy"] for s in status.values()) else 1)
    except local_stack.StackError as error:
        _fail(str(error))


@app.command()
def alerts() -> None:
    """Apply recflow's alerts (infra/automations.yaml: failed, late and missing nightly runs,
    unhealthy lists) to the Prefect server at PREFECT_API_URL, sending through a webhook
    block with the URL in RECFLOW_ALERT_WEBHOOK_URL (Slack's incoming webhooks work as they
    are). Run it again after changing either: each automation is updated in place."""
    from prefect.settings import PREFECT_API_URL

    from flows import stack as local_stack

    if not PREFECT_API_URL.value():
        _fail("PREFECT_API_URL is not set: the alerts go to the Prefect server that runs the nightly flow")
    if not os.environ.get(local_stack.ALERT_WEBHOOK):
        _fail(f"{local_stack.ALERT_WEBHOOK} is not set: the webhook URL the alerts are sent to")
    typer.echo(f"alerts: {local_stack.apply_alerts(PREFECT_API_URL.value())} on {PREFECT_API_URL.value()}")


@app.command()
def bench(
    datasets: Annotated[list[str], typer.Argument(help="dataset directories, 'movielens:<name>' or 'synthetic'")],
    results: Annotated[Path, typer.Option(help="where to write quality-<dataset>.json")] = Path("bench/results"),
) -> None:
    """Score `recflow run --top-k 10` against classical baselines under the quality protocol
    (docs/quality.md), one dataset after another; the tables go to docs/quality.md and the README's summary."""
    script = Path(__file__).resolve().parents[1] / "bench" / "quality.py"
    if not script.exists():
        _fail(f"{script} not found; the benchmark runs from a source checkout")
    raise typer.Exit(subprocess.call([sys.executable, str(script), *datasets, "--results", str(results)]))


def _pipeline_config(path: Path | None, **flags):
    """The config file (if any) with the command-line flags on top, and a writable workspace."""
    overrides = {k: (str(v) if isinstance(v, Path) else v) for k, v in flags.items() if v is not None}
    pipeline_config = _config(path, overrides)
    _check_workspace(pipeline_config.workspace_path())
    return pipeline_config


def _start_prefect_server():
    """In ephemeral mode (no PREFECT_API_URL) start Prefect's temporary server now, before
    this process imports the pipeline: it boots in its own process (~8 s on 2 cores) while
    those imports run (`flows.stack.TemporaryPrefect`). None when a server is configured."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from flows.stack import TemporaryPrefect

    return TemporaryPrefect()


def _preload(server) -> None:
    """Import MLflow, Great Expectations and TensorFlow, in that order, while Prefect's
    temporary server boots, before the flow starts: on 2 cores that hides them behind the
    boot, and keeps them from running while a stage logs (TensorFlow's import silences the
    process's stderr for a moment). Once the server answers the flow starts, and a stage
    imports what it needs itself: a rerun whose stages are all reused needs neither
    TensorFlow nor Great Expectations. A failed preload only means the stage pays for it."""
    try:
        for module in ("mlflow.tracking", "great_expectations", "tasks.tfenv"):
            if server is None or not server.booting():
                return
            importlib.import_module(module)
    except Exception:  # noqa: BLE001 - the stage's own import reports it
        logging.getLogger(__name__).debug("preload failed", exc_info=True)


def _user_errors_in_one_line(server, flow, *args):
    """Run `flow` once the Prefect API answers (`server`: the temporary one, or None for
    PREFECT_API_URL's); a user error ends in one line."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    from flows.stack import StackError
    from tasks.workspace import RecflowError

    if server is None:
        _check_prefect()
    _quiet_user_errors(RecflowError)
    _preload(server)
    if server is not None:
        try:
            server.wait(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
        except StackError as error:
            _fail(str(error))
    try:
        return flow(*args)
    except RecflowError as error:
        # Keep our line last: Prefect's loggers, and its events worker's "Still processing
        # items" warning as it drains at exit (a logger outside "prefect"); errors still show.
        logging.getLogger("prefect").setLevel(logging.WARNING)
        logging.getLogger("EventsWorker").setLevel(logging.ERROR)
        _fail(str(error))


def _check_prefect() -> None:
    """With PREFECT_API_URL set, fail fast when that server does not answer."""
    import urllib.request

    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # ephemeral mode: the flow starts its own temporary server
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10):
            return
    except OSError as error:
        _fail(f"Prefect API {url} is unreachable ({getattr(error, 'reason', error)}); start it (`recflow stack up`) "
              "or unset PREFECT_API_URL to run in ephemeral mode")


def _workspace(workspace: Path | None) -> Path:
    from schemas.config import PipelineConfig

    return PipelineConfig(**({"workspace": str(workspace)} if workspace else {})).workspace_path()


def _print_table(table) -> None:
    import polars as pl

    with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=160, tbl_width_chars=400, tbl_hide_dataframe_shape=True,
                   tbl_hide_column_data_types=True):
        typer.echo(str(table))


def _date(value: str | None, flag: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except ValueError:
        _fail(f"{flag} {value!r} is not a date; use YYYY-MM-DD")


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


def main() -> None:
    """The `recflow` command. At exit the interpreter's last garbage collection walks every
    object the run created (TensorFlow's graphs, Prefect's and MLflow's clients: about 4 s
    after a ml-latest-small run on 2 cores) only to free memory the OS frees anyway; frozen
    objects are skipped. Exit handlers (Prefect's temporary server, log flushes) still run."""
    try:
        app()
    finally:
        gc.freeze()


if __name__ == "__main__":
    main()
