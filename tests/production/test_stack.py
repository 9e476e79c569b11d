"""The production topology (`recflow stack up --backend postgres`): PostgreSQL, Prefect and
MLflow servers on it, the `recflow` process work pool with the deployments of
infra/prefect.yaml, and a worker. Runs are triggered through the Prefect API as the UI
does (the deployment's parameters with some fields changed) on the small synthetic data;
servers are killed and restarted under them; 17 runs are asked for at once.

Each test uses its own run dates and, where it counts runs or partitions, its own
workspace and MLflow experiment, so the tests pass in any order on the one stack. The
stack's alerts (infra/automations.yaml) post to a webhook receiver on loopback that the
module starts; each alert test looks only for the notifications naming its own flow run.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import shutil
import signal
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import FAST_RUN, ROOT, cli

pytestmark = pytest.mark.production

REPORT = ROOT / "test-artifacts" / "production-load.json"
ALERTS = ROOT / "test-artifacts" / "production-alerts.json"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
LATE_AFTER_S = 20  # the stack's Late threshold here: a run the worker has not started 20 s after its schedule


class Receiver:
    """A webhook endpoint on loopback, standing in for Slack: it keeps the `text` of each
    JSON POST it receives."""

    def __init__(self):
        received = self.received = []
        self.arrived: dict[str, float] = {}  # text -> when it came (time.monotonic())
        self.measured: dict[str, float] = {}  # what the tests measured, for the report

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(this):
                body = this.rfile.read(int(this.headers.get("Content-Length", 0)))
                text = json.loads(body)["text"]
                self.arrived.setdefault(text, time.monotonic())
                received.append(text)
                this.send_response(200)
                this.end_headers()

            def log_message(this, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def naming(self, *words: str, timeout: float, settle: float = 0) -> list[str]:
        """The notifications holding every one of `words`, once at least one has come (or
        `timeout` s have passed), and `settle` s more for any second copy."""
        deadline = time.monotonic() + timeout
        while not (found := [t for t in self.received if all(w in t for w in words)]) and time.monotonic() < deadline:
            time.sleep(0.5)
        if found and settle:
            time.sleep(settle)
            found = [t for t in self.received if all(w in t for w in words)]
        return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Stack:
    """The stack under test: its directory, ports and API clients."""

    def __init__(self, directory: Path, receiver: Receiver):
        self.directory = directory
        self.receiver = receiver
        self.ports = {"prefect": _free_port(), "mlflow": _free_port(), "postgres": _free_port()}
        self.prefect = f"http://127.0.0.1:{self.ports['prefect']}/api"
        self.mlflow = f"http://127.0.0.1:{self.ports['mlflow']}"

    def up(self) -> str:
        """`recflow stack up --backend postgres`; what it started."""
        done = cli("stack", "up", "--backend", "postgres", "--dir", str(self.directory),
                   "--prefect-port", str(self.ports["prefect"]), "--mlflow-port", str(self.ports["mlflow"]),
                   "--postgres-port", str(self.ports["postgres"]), timeout=600,
                   env=os.environ | {"RECFLOW_ALERT_WEBHOOK_URL": self.receiver.url,
                                     "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": str(LATE_AFTER_S)})
        assert done.returncode == 0, done.stdout + done.stderr + self.logs()
        assert "alerts: 4 automations of infra/automations.yaml" in done.stdout, done.stdout
        return done.stdout.split("(started: ")[1].split(";")[0]

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> None:
        """Stop one process of the stack (its process group) and wait until it is gone."""
        pid = json.loads((self.directory / "stack.json").read_text())["servers"][name]["pid"]
        os.killpg(pid, sig)
        deadline = time.monotonic() + 60
        while _status(self.directory)[name]["alive"]:
            assert time.monotonic() < deadline, f"{name} did not stop"
            time.sleep(0.2)

    def logs(self) -> str:
        return "".join(f"\n--- {log.name}\n" + log.read_text()[-3000:] for log in self.directory.glob("*.log"))

    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.prefect}):
            return get_client(sync_client=True)

    def mlflow_client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.mlflow, registry_uri=self.mlflow)

    def submit(self, deployment: str, **changes) -> str:
        """A flow run of `deployment` as the UI's custom-run form creates it: the deployment's
        parameters with `changes` (config fields, or the backfill's dates); its id."""
        with self.client() as client:
            found = client.read_deployment_by_name(deployment)
            config = found.parameters["config"] | FAST_RUN | changes.pop("config", {})
            run = client.create_flow_run_from_deployment(found.id, parameters={"config": config, **changes})
        return str(run.id)

    def state(self, flow_run_id: str):
        return self.flow_run(flow_run_id).state

    def flow_run(self, flow_run_id: str):
        with self.client() as client:
            return client.read_flow_run(flow_run_id)

    def wait(self, flow_run_id: str, timeout: float = 600):
        """The flow run's final state."""
        deadline = time.monotonic() + timeout
        while (state := self.state(flow_run_id)).type.value not in FINAL:
            assert time.monotonic() < deadline, f"flow run {flow_run_id} still {state.name}" + self.logs()
            time.sleep(2)
        return state

    def champion(self):
        from mlflow.exceptions import MlflowException

        try:
            return self.mlflow_client().get_model_version_by_alias("recflow-retrieval", "champion").version
        except MlflowException:
            return None


def _status(directory: Path) -> dict:
    done = cli("stack", "status", "--dir", str(directory))
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def stack():
    # PostgreSQL runs as the `postgres` user when the tests run as root: its data directory
    # must be reachable by that user, which pytest's private tmp directories are not.
    directory = Path(tempfile.mkdtemp(prefix="recflow-production-"))
    directory.chmod(0o755)
    stack = Stack(directory, Receiver())
    try:
        assert stack.up() == "postgres,prefect,mlflow,worker"
        yield stack
    finally:
        ALERTS.parent.mkdir(parents=True, exist_ok=True)
        ALERTS.write_text(json.dumps({"measured": stack.receiver.measured,  # what the team would have been told
                                      "notifications": stack.receiver.received}, indent=2))
        stopped = cli("stack", "down", "--dir", str(directory), timeout=300)
        assert stopped.returncode == 0, stopped.stderr
        assert not any(s["alive"] for s in _status(directory).values())
        shutil.rmtree(directory, ignore_errors=True)


def _partition(workspace: Path, day: dt.date) -> pl.DataFrame | None:
    path = workspace / "recommendations" / f"run_date={day}"
    return pl.read_parquet(path / "*.parquet") if path.exists() else None


def _assert_published(workspace: Path, day: dt.date, top_k: int) -> pl.DataFrame:
    table = _partition(workspace, day)
    assert table is not None, f"no partition for {day} in {workspace}"
    assert table.group_by("user_id").len()["len"].unique().to_list() == [top_k]
    assert table["run_date"].unique().to_list() == [day]
    return table


def _runs(stack: Stack, experiment: str) -> list:
    found = stack.mlflow_client().get_experiment_by_name(experiment)
    return stack.mlflow_client().search_runs([found.experiment_id], order_by=["attributes.start_time ASC"]) \
        if found else []


def test_the_stack_is_postgres_backed_with_a_work_pool_and_the_infra_deployments(stack):
    import psycopg2

    status = _status(stack.directory)
    assert set(status) == {"postgres", "prefect", "mlflow", "worker"} and all(s["healthy"] for s in status.values())
    with psycopg2.connect(host="127.0.0.1", port=stack.ports["postgres"], user="recflow", password="recflow",
                          dbname="postgres") as connection, connection.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database")
        assert {"prefect", "mlflow"} <= {row[0] for row in cursor.fetchall()}
    with stack.client() as client:
        pool = client.read_work_pool("recflow")
        nightly = client.read_deployment_by_name("recflow-nightly/nightly")
        backfill = client.read_deployment_by_name("recflow-backfill/nightly-backfill")
    assert pool.type == "process" and pool.concurrency_limit == 1
    assert nightly.work_pool_name == backfill.work_pool_name == "recflow"
    assert nightly.schedules[0].schedule.cron == "0 2 * * *"
    assert nightly.parameters["config"]["workspace"] == str(stack.directory / "workspace")
    assert stack.up() == "nothing"  # a second `up` leaves a running stack alone, and its alerts
    with stack.client() as client:
        names = [automation.name for automation in client.read_automations()]
    assert sorted(names) == sorted(["recflow: nightly run failed", "recflow: nightly run late",
                                    "recflow: no nightly run completed in 26 hours", "recflow: lists unhealthy"])


def test_a_failed_nightly_run_delivers_one_notification_naming_it_within_60_seconds(stack):
    run_id = stack.submit("recflow-nightly/nightly",
                          config={"run_date": "2026-10-21", "source": str(stack.directory / "no-such-source")})
    state = stack.wait(run_id)
    assert state.is_failed() and "no-such-source" in state.message, state
    ended = time.monotonic()
    name = stack.flow_run(run_id).name
    found = stack.receiver.naming(f"nightly run {name} Failed", timeout=60, settle=10)
    assert len(found) == 1, stack.receiver.received
    # (the run's end is seen by polling every 2 s, so this is the delay at most)
    stack.receiver.measured["failed_run_notified_within_s"] = round(max(0.0, stack.receiver.arrived[found[0]] - ended)
                                                                    + 2, 1)
    assert "no-such-source" in found[0] and f"/runs/flow-run/{run_id}" in found[0], found[0]


def test_a_run_no_worker_picks_up_delivers_a_late_notification(stack):
    """A deployment of the nightly flow on a pool no worker polls: its run never starts."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.states import Scheduled

    with stack.client() as client:
        pool = client.create_work_pool(WorkPoolCreate(name="recflow-unattended", type="process"), overwrite=True)
        flow_id = client.read_deployment_by_name("recflow-nightly/nightly").flow_id
        deployment = client.create_deployment(flow_id=flow_id, name="late-probe", work_pool_name=pool.name,
                                              entrypoint="flows/nightly.py:nightly")
        run = client.create_flow_run_from_deployment(deployment, state=Scheduled())
        scheduled = time.monotonic()
    try:
        found = stack.receiver.naming(f"nightly run {run.name} Late", timeout=LATE_AFTER_S + 60)
        assert len(found) == 1 and f"/runs/flow-run/{run.id}" in found[0], stack.receiver.received
        stack.receiver.measured["late_run_notified_after_scheduled_s"] = round(
            stack.receiver.arrived[found[0]] - scheduled, 1)
    finally:
        with stack.client() as client:
            client.delete_flow_run(run.id)
            client.delete_deployment(deployment)
            client.delete_work_pool(pool.name)


def test_a_list_health_breach_fails_the_run_keeps_the_last_lists_and_delivers_one_notification(stack):
    from tasks.health import last_published

    workspace, day = stack.directory / "workspace", dt.date(2026, 10, 3)
    if last_published(workspace, day) is None:
        assert stack.wait(stack.submit("recflow-nightly/nightly", config={"run_date": "2026-09-30"})).is_completed()
    before = last_published(workspace, day)
    files = {path: path.read_bytes() for path in before.iterdir()}
    # a threshold no list can meet: tonight's coverage would have to be 1000x the last night's
    run_id = stack.submit("recflow-nightly/nightly",
                          config={"run_date": day.isoformat(), "monitoring": {"min_coverage_change": 1000}})
    state = stack.wait(run_id)
    assert state.is_failed(), state
    assert "list health: coverage_change" in state.message and "monitoring.min_coverage_change 1000" in state.message
    assert _partition(workspace, day) is None
    assert last_published(workspace, day) == before and {p: p.read_bytes() for p in before.iterdir()} == files
    name = stack.flow_run(run_id).name
    found = stack.receiver.naming(f"Flow run {name}: tonight's lists", timeout=60, settle=10)
    assert len(found) == 1 and "coverage_change" in found[0] and f"/runs/flow-run/{run_id}" in found[0], found
    assert len(stack.receiver.naming(f"nightly run {name} Failed", timeout=60)) == 1


def test_nightly_and_custom_runs_through_the_api_complete_with_mlflow_registry_and_partitions(stack):
    workspace = stack.directory / "workspace"
    plain, custom = dt.date(2026, 10, 1), dt.date(2026, 10, 2)
    first = stack.wait(stack.submit("recflow-nightly/nightly", config={"run_date": plain.isoformat()}))
    assert first.is_completed(), first.message + stack.logs()
    second = stack.wait(stack.submit("recflow-nightly/nightly", config={"run_date": custom.isoformat(), "top_k": 7}))
    assert second.is_completed(), second.message + stack.logs()
    _assert_published(workspace, plain, FAST_RUN["top_k"])
    _assert_published(workspace, custom, 7)
    runs = {run.data.tags["run_date"]: run for run in _runs(stack, "recflow")}
    assert runs[str(custom)].data.params["top_k"] == "7" and runs[str(custom)].info.status == "FINISHED"
    assert "ndcg_at_10" in runs[str(plain)].data.metrics
    latest = runs[str(custom)]
    champion = stack.mlflow_client().get_model_version_by_alias("recflow-retrieval", "champion")
    if latest.data.tags["promoted"] == "true":
        assert champion.run_id == latest.info.run_id
    assert stack.mlflow_client().get_model_version_by_alias("recflow-ranking", "champion").version == champion.version
    # artifacts went through the server into the stack's artifact store
    assert list((stack.directory / "mlartifacts").rglob("saved_model.pb"))


def test_a_worker_with_an_empty_workspace_gates_against_the_registry_champion(stack):
    if stack.champion() is None:
        assert stack.wait(stack.submit("recflow-nightly/nightly", config={"run_date": "2026-10-05"})).is_completed()
    champion = stack.champion()
    empty = stack.directory / "fresh-container"
    assert not empty.exists()
    day = dt.date(2026, 10, 6)
    state = stack.wait(stack.submit("recflow-nightly/nightly",
                                    config={"run_date": day.isoformat(), "workspace": str(empty)}))
    assert state.is_completed(), state.message + stack.logs()
    _assert_published(empty, day, FAST_RUN["top_k"])
    (run,) = [r for r in _runs(stack, "recflow") if r.data.tags["run_date"] == str(day)]
    decision = run.data.tags["champion_decision"]
    assert f"champion v{champion}" in decision, decision  # compared with (or identical to) the registry's champion
    key = stack.mlflow_client().get_model_version("recflow-retrieval", champion).tags["model_key"]
    assert (empty / "models" / key).is_dir()  # the champion's models, fetched from the registry


def test_mlflow_killed_during_training_fails_the_run_in_one_line_and_the_next_run_completes(stack):
    workspace = stack.directory / "workspace"
    day = dt.date(2026, 10, 10)
    champion = stack.champion()
    run_id = stack.submit("recflow-nightly/nightly", config={"run_date": day.isoformat()})
    _wait_for_task(stack, run_id, "train_retrieval")
    stack.kill("mlflow")
    state = stack.wait(run_id)
    assert state.is_failed(), state
    assert "MLflow tracking server" in state.message and "stopped answering" in state.message, state.message
    assert "\n" not in state.message.strip()
    assert _partition(workspace, day) is None
    assert stack.up() == "mlflow"
    assert stack.champion() == champion
    state = stack.wait(stack.submit("recflow-nightly/nightly", config={"run_date": day.isoformat()}))
    assert state.is_completed(), state.message + stack.logs()
    _assert_published(workspace, day, FAST_RUN["top_k"])


def _wait_for_task(stack: Stack, flow_run_id: str, task: str, timeout: float = 300) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    deadline = time.monotonic() + timeout
    with stack.client() as client:
        while True:
            runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if any(r.name.startswith(task) and r.state and r.state.is_running() for r in runs):
                return
            assert client.read_flow_run(flow_run_id).state.type.value not in FINAL, "the run ended before " + task
            assert time.monotonic() < deadline, f"{task} never ran" + stack.logs()
            time.sleep(0.3)


def test_postgres_restarted_between_two_runs_the_next_run_completes(stack):
    workspace = stack.directory / "workspace"
    before, after = dt.date(2026, 10, 14), dt.date(2026, 10, 15)
    assert stack.wait(stack.submit("recflow-nightly/nightly", config={"run_date": before.isoformat()})).is_completed()
    stack.kill("postgres", signal.SIGINT)
    assert stack.up() == "postgres"
    state = stack.wait(stack.submit("recflow-nightly/nightly", config={"run_date": after.isoformat()}))
    assert state.is_completed(), state.message + stack.logs()
    _assert_published(workspace, after, FAST_RUN["top_k"])
    assert {str(before), str(after)} <= {r.data.tags["run_date"] for r in _runs(stack, "recflow")}


def test_prefect_stopped_while_a_run_is_queued_the_run_is_picked_up_once_it_is_back(stack):
    workspace = stack.directory / "workspace"
    day = dt.date(2026, 10, 18)
    run_id = stack.submit("recflow-nightly/nightly", config={"run_date": day.isoformat()})
    stack.kill("prefect", signal.SIGTERM)
    time.sleep(10)
    started = stack.up()
    assert "prefect" in started
    state = stack.wait(run_id)
    table = _partition(workspace, day)
    if state.is_completed():
        _assert_published(workspace, day, FAST_RUN["top_k"])
    else:  # reported as crashed or failed: never half-published
        assert state.is_crashed() or state.is_failed(), state
        assert table is None


def test_a_backfill_and_three_ui_runs_at_once_all_complete_in_date_order(stack):
    workspace, experiment = stack.directory / "load-workspace", "recflow-load"
    start = dt.date(2026, 9, 1)
    dates = [start + dt.timedelta(days=offset) for offset in range(17)]
    config = {"workspace": str(workspace), "mlflow_experiment": experiment}
    began = time.monotonic()
    flow_runs = [stack.submit("recflow-backfill/nightly-backfill", config=config, start=str(dates[0]),
                              end=str(dates[13]))]
    flow_runs += [stack.submit("recflow-nightly/nightly", config=config | {"run_date": str(day)}) for day in dates[14:]]
    states = [stack.wait(run_id, timeout=1800) for run_id in flow_runs]
    seconds = time.monotonic() - began
    assert all(state.is_completed() for state in states), [s.message for s in states]
    for day in dates:
        _assert_published(workspace, day, FAST_RUN["top_k"])
    assert sorted(p.name for p in (workspace / "recommendations").glob("run_date=*")) == [
        f"run_date={day}" for day in dates]
    runs = _runs(stack, experiment)
    assert [r.data.tags["run_date"] for r in runs] == [str(day) for day in dates]  # none lost or twice, in order
    assert all(r.info.status == "FINISHED" for r in runs)
    with stack.client() as client:
        timings = [client.read_flow_run(run_id) for run_id in flow_runs]
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({
        "runs": len(dates), "wall_s": round(seconds, 1),
        "backfill_s": round(timings[0].total_run_time.total_seconds(), 1),
        "nightly_s": [round(t.total_run_time.total_seconds(), 1) for t in timings[1:]],
        "mean_run_s": round(statistics.mean(r.data.metrics["time_total_s"] for r in runs), 1),
    }, indent=2))
