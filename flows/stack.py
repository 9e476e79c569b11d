"""The servers the flows talk to outside embedded mode, and the deployments served to them.

`up` starts a stack of background processes whose state and logs live in one directory:

- `sqlite` (the default): a Prefect server and an MLflow tracking server, both on sqlite;
  `recflow serve` then serves the deployments from its own process.
- `postgres`: the production topology of infra/docker-compose.yml without Docker: Debian's
  PostgreSQL on a loopback port (data under the directory), Prefect and MLflow servers on
  it (MLflow proxies the artifacts), the `recflow` process work pool (one flow run at a
  time) with the deployments of infra/prefect.yaml, and a worker.

`up` starts only what is not running already, so after a server died it brings that one
back, and applies the alerts of infra/automations.yaml (`apply_alerts`); `down` stops
everything (the data stays); `status` checks each process.
`TemporaryPrefect` is the server of one command in ephemeral mode. `serve_deployments`
registers the nightly flow (on a cron schedule) and the backfill flow with the Prefect
server and runs whatever the schedule or the UI asks for in this process.
"""

from __future__ import annotations

import atexit
import glob
import json
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from schemas.config import PipelineConfig

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]  # the checkout the worker runs the flows from
STATE = "stack.json"
BACKENDS = ("sqlite", "postgres")
POOL = "recflow"
# How long the worker's runs retry a tracking server that does not answer (urllib3 backoff
# 2, 4, 8, 16 s) before they fail with one line; MLflow's own default waits ~4 minutes.
MLFLOW_RETRIES = "4"
# Alerts (infra/automations.yaml): the notification block the automations send through, and
# the environment variable holding its webhook URL.
ALERTS = ROOT / "infra" / "automations.yaml"
ALERT_BLOCK = "recflow-alerts"
ALERT_WEBHOOK = "RECFLOW_ALERT_WEBHOOK_URL"
LATE_AFTER_S = "600"  # a nightly run not started 10 minutes after its schedule is Late (and alerted)

log = logging.getLogger(__name__)


class StackError(Exception):
    """A server that would not start, or a stack that is not there."""


def up(directory: Path, host: str, prefect_port: int, mlflow_port: int, backend: str = "sqlite",
       postgres_port: int = 5432, timeout: float = 240) -> dict[str, str]:
    """Start the stack's processes that are not running (all of them the first time), wait
    until each answers, and return the URLs to point recflow at."""
    if backend not in BACKENDS:
        raise StackError(f"unknown backend {backend!r}: use {' or '.join(BACKENDS)}")
    directory.mkdir(parents=True, exist_ok=True)
    state = _read_state(directory)
    if state.get("backend", backend) != backend:
        raise StackError(f"{directory} holds a {state['backend']} stack; `recflow stack down --dir {directory}` "
                         "it first, or use another --dir")
    prefect_url, mlflow_url = f"http://{host}:{prefect_port}/api", f"http://{host}:{mlflow_port}"
    specs = _specs(directory, backend, host, prefect_url, prefect_port, mlflow_url, mlflow_port, postgres_port)
    servers = state.get("servers", {})
    deadline = time.monotonic() + timeout
    try:
        started = _up(directory, backend, specs, servers, postgres_port, deadline, timeout)
    except StackError:
        if not state:  # nothing was running before: leave nothing half-started
            down(directory)
        raise
    (directory / "env").write_text(f"export PREFECT_API_URL={prefect_url}\nexport MLFLOW_TRACKING_URI={mlflow_url}\n")
    return {"prefect": prefect_url, "mlflow": mlflow_url, "started": ",".join(started) or "nothing",
            "alerts": apply_alerts(prefect_url)}


def apply_alerts(prefect_url: str) -> str:
    """Save the `recflow-alerts` webhook block (URL from RECFLOW_ALERT_WEBHOOK_URL) and
    create, or update in place, each automation of infra/automations.yaml on the Prefect
    server at `prefect_url`; a line saying what it did. Without the variable nothing is
    applied (there is nowhere to send an alert)."""
    webhook = os.environ.get(ALERT_WEBHOOK)
    if not webhook:
        return f"off ({ALERT_WEBHOOK} is not set)"
    import yaml
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore
    from prefect.settings import PREFECT_API_URL, temporary_settings

    specs = yaml.safe_load(ALERTS.read_text())["automations"]
    with temporary_settings({PREFECT_API_URL: prefect_url}):
        block = CustomWebhookNotificationBlock(name=ALERT_BLOCK, url=webhook,
                                               json_data={"text": "{{subject}}\n{{body}}"})
        block_id = str(block.save(ALERT_BLOCK, overwrite=True))
        with get_client(sync_client=True) as client:
            for spec in specs:
                for action in spec["actions"]:
                    if action.get("block_document_id") == ALERT_BLOCK:
                        action["block_document_id"] = block_id
                automation = AutomationCore.model_validate(spec)
                found = client.read_automations_by_name(automation.name)
                if found:
                    client.update_automation(found[0].id, automation)
                    for duplicate in found[1:]:
                        client.delete_automation(duplicate.id)
                else:
                    client.create_automation(automation)
    log.info("alerts: %d automation(s) of %s sending to block %s", len(specs), ALERTS.name, ALERT_BLOCK)
    return f"{len(specs)} automations of infra/automations.yaml, block {ALERT_BLOCK}"


def _up(directory: Path, backend: str, specs: dict, servers: dict, postgres_port: int, deadline: float,
        timeout: float) -> list[str]:
    """Start each process of `specs` that `servers` (the state) does not hold alive, in
    order, waiting for each to answer; the names of those it started."""
    started = []
    for name, spec in specs.items():
        running = servers.get(name)
        if running is None or not _alive(running["pid"]):
            if name == "postgres":
                _init_postgres(directory, spec)
            if name == "worker":
                _deploy(directory, spec["env"]["PREFECT_API_URL"])
            log.info("starting %s", name)
            servers[name] = _start(spec["command"], directory / f"{name}.log", spec["env"], spec.get("user")) | {
                key: spec[key] for key in ("url", "health", "stop") if key in spec}
            started.append(name)
            _write_state(directory, backend, servers)
        _wait(directory, name, servers[name], deadline, timeout)
        if name == "postgres":
            _create_databases(postgres_port)
    return started


def down(directory: Path) -> str:
    """Stop every process of the stack (their whole process groups), the last started
    first; their data stays in `directory`."""
    state = _read_state(directory)
    if not state:
        return f"no stack in {directory}"
    for name, server in reversed(state["servers"].items()):
        if _alive(server["pid"]):
            os.killpg(server["pid"], getattr(signal, server.get("stop", "SIGTERM")))
        for _ in range(60):
            if not _alive(server["pid"]):
                break
            time.sleep(0.5)
        else:
            os.killpg(server["pid"], signal.SIGKILL)
    (directory / STATE).unlink()
    return f"stack in {directory} stopped"


def status(directory: Path) -> dict[str, dict]:
    """Each process's URL (if it serves one), pid, and whether it is alive and answering."""
    servers = _read_state(directory).get("servers", {})
    return {
        name: {"url": s.get("url"), "pid": s["pid"], "alive": _alive(s["pid"]),
               "healthy": _alive(s["pid"]) and _healthy(s.get("health"))}
        for name, s in servers.items()
    }


def _specs(directory: Path, backend: str, host: str, prefect_url: str, prefect_port: int, mlflow_url: str,
           mlflow_port: int, postgres_port: int) -> dict[str, dict]:
    """What each process of the stack runs, in start order."""
    specs = {}
    prefect_env = {"PREFECT_HOME": str(directory / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                   # the UI asks the API at this address, whatever --port says; alerts link to the UI
                   "PREFECT_UI_API_URL": prefect_url, "PREFECT_SERVER_API_HOST": host,
                   "PREFECT_SERVER_API_PORT": str(prefect_port), "PREFECT_UI_URL": prefect_url.removesuffix("/api"),
                   "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS": os.environ.get(
                       "PREFECT_SERVER_SERVICES_LATE_RUNS_AFTER_SECONDS", LATE_AFTER_S)}
    mlflow_store = f"sqlite:///{directory / 'mlflow.db'}"
    if backend == "postgres":
        binaries = _postgres_binaries()
        specs["postgres"] = {
            "command": [str(binaries / "postgres"), "-D", str(directory / "postgres"), "-p", str(postgres_port),
                        "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={directory / 'postgres'}"],
            "env": {}, "user": _postgres_user(), "stop": "SIGINT",  # SIGINT: fast shutdown, clients disconnected
            "health": [str(binaries / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(postgres_port)],
            "initdb": str(binaries / "initdb"),
        }
        database = f"recflow:{_password()}@127.0.0.1:{postgres_port}"
        prefect_env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"postgresql+asyncpg://{database}/prefect"
        mlflow_store = f"postgresql+psycopg2://{database}/mlflow"
    specs["prefect"] = {
        "command": [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
        "env": prefect_env, "url": prefect_url, "health": f"{prefect_url}/health",
    }
    specs["mlflow"] = {
        "command": [str(BIN / "mlflow"), "server", "--host", host, "--port", str(mlflow_port), "--workers", "1",
                    "--backend-store-uri", mlflow_store, "--artifacts-destination", str(directory / "mlartifacts")],
        "env": {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, "url": mlflow_url, "health": f"{mlflow_url}/health",
    }
    if backend == "postgres":
        specs["worker"] = {
            "command": [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"],
            "env": {"PREFECT_API_URL": prefect_url, "MLFLOW_TRACKING_URI": mlflow_url, "RECFLOW_HOME": str(ROOT),
                    "PREFECT_HOME": str(directory / "worker"), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": MLFLOW_RETRIES,
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false"},
            "health": None,
        }
    return specs


def _postgres_binaries() -> Path:
    """The newest PostgreSQL server's bin directory (Debian's layout, or `postgres` on PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(Path(p).parts[-3]))
    server = found[-1] if found else shutil.which("postgres")
    if not server:
        raise StackError("PostgreSQL is not installed; `make postgres` installs Debian's package")
    return Path(server).parent


def _postgres_user() -> str | None:
    """PostgreSQL refuses to run as root: as root it runs as the `postgres` system user."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres").pw_name
    except KeyError:
        raise StackError("running as root, PostgreSQL needs the `postgres` system user (`make postgres` installs "
                         "Debian's package, which creates it)") from None


def _password() -> str:
    return os.environ.get("RECFLOW_DB_PASSWORD", "recflow")


def _init_postgres(directory: Path, spec: dict) -> None:
    """A new database cluster under `directory` (once): user `recflow`, password login from
    loopback."""
    data = directory / "postgres"
    if (data / "PG_VERSION").exists():
        return
    data.mkdir(mode=0o700, exist_ok=True)
    password = directory / ".pgpass-init"
    password.write_text(_password() + "\n")
    user = spec.get("user")
    if user:
        for path in (data, password):
            shutil.chown(path, user, user)
    try:
        done = subprocess.run(
            [spec["initdb"], "-D", str(data), "-U", "recflow", "-E", "UTF8", "--auth-local=trust",
             "--auth-host=scram-sha-256", f"--pwfile={password}"],
            capture_output=True, text=True, user=user, stdin=subprocess.DEVNULL, cwd="/",
        )
    finally:
        password.unlink()
    if done.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        hint = f" (as root it runs as `{user}`, who must be able to reach {directory})" if user else ""
        raise StackError(f"initdb failed{hint}: {(done.stderr or done.stdout).strip().splitlines()[-1]}")


def _create_databases(port: int) -> None:
    """Prefect's and MLflow's databases, when missing."""
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=port, user="recflow", password=_password(),
                                  dbname="postgres")
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            for name in ("prefect", "mlflow"):
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cursor.fetchone() is None:
                    cursor.execute(f"CREATE DATABASE {name}")
    finally:
        connection.close()


def _deploy(directory: Path, prefect_url: str) -> None:
    """The `recflow` process work pool (one flow run at a time: runs share the workspace)
    and the deployments of infra/prefect.yaml, whose runs write to directory/workspace."""
    prefect_yaml = ROOT / "infra" / "prefect.yaml"
    if not prefect_yaml.exists():
        raise StackError(f"{prefect_yaml} not found; the postgres stack runs from a source checkout")
    env = os.environ | {"PREFECT_API_URL": prefect_url, "RECFLOW_HOME": str(ROOT),
                        "RECFLOW_WORKSPACE": str(directory / "workspace"), "PREFECT_HOME": str(directory / "worker")}
    for command in (["work-pool", "create", POOL, "--type", "process", "--overwrite"],
                    ["work-pool", "set-concurrency-limit", POOL, "1"],
                    ["deploy", "--prefect-file", str(prefect_yaml), "--all"]):
        done = subprocess.run([str(BIN / "prefect"), "--no-prompt", *command], env=env, cwd=ROOT,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        with open(directory / "deploy.log", "a") as log_file:
            log_file.write(done.stdout + done.stderr)
        if done.returncode != 0:
            raise StackError(f"`prefect {' '.join(command[:2])}` failed; see {directory / 'deploy.log'}")


def _wait(directory: Path, name: str, server: dict, deadline: float, timeout: float) -> None:
    while not _healthy(server.get("health")):
        if not _alive(server["pid"]):
            raise StackError(f"{name} exited at start; see {directory / (name + '.log')}")
        if time.monotonic() > deadline:
            raise StackError(f"{name} did not answer within {timeout:.0f}s; see {directory / (name + '.log')}")
        time.sleep(1)


def _read_state(directory: Path) -> dict:
    state = directory / STATE
    found = json.loads(state.read_text()) if state.exists() else {}
    if found and "servers" not in found:  # written by an earlier recflow: {name: server}, sqlite
        found = {"backend": "sqlite", "servers": found}
    return found


def _write_state(directory: Path, backend: str, servers: dict) -> None:
    (directory / STATE).write_text(json.dumps({"backend": backend, "servers": servers}, indent=2))


def serve_deployments(config: PipelineConfig, name: str, cron: str, timezone: str) -> None:
    """Serve `name` (nightly, on `cron` in `timezone`) and `name`-backfill until interrupted."""
    from prefect import serve
    from prefect.schedules import Cron
    from prefect.settings import PREFECT_API_URL

    from flows.nightly import backfill, nightly

    if not PREFECT_API_URL.value():
        raise ValueError("PREFECT_API_URL is not set; start a server (`recflow stack up`) and export its URL")
    schedule = Cron(cron, timezone=timezone)
    source = Path(config.source)
    defaults = config.model_copy(update={
        "workspace": str(config.workspace_path()),
        "source": str(source.resolve()) if source.exists() else config.source,
    })
    serve(
        nightly.to_deployment(
            name=name, schedule=schedule, parameters={"config": defaults.model_dump(mode="json")}, tags=["recflow"],
            description="recflow nightly run; run_date empty = today (UTC)",
        ),
        backfill.to_deployment(
            name=f"{name}-backfill", parameters={"config": defaults.model_dump(mode="json")}, tags=["recflow"],
            description="replay the nightly run over past dates, oldest first",
        ),
        limit=1,
    )


# Runs uvicorn (argv after the parent's pid) as `python -m uvicorn` would, and stops it
# (SIGTERM, as `stop` does) once the process that started it is gone: a command killed
# with SIGKILL, or by the kernel for memory, runs no exit handler.
_UVICORN_WHILE_PARENT_LIVES = """
import os, runpy, signal, sys, threading, time
parent = int(sys.argv.pop(1))
def watch():
    while os.getppid() == parent:
        time.sleep(1)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=watch, daemon=True).start()
sys.argv[0] = "uvicorn"
runpy.run_module("uvicorn", run_name="__main__", alter_sys=True)
"""


class TemporaryPrefect:
    """Prefect's temporary server for one command in ephemeral mode (no PREFECT_API_URL),
    started as Prefect starts it (its API app under uvicorn, on a free loopback port, UI
    off, this process's Prefect settings) but without importing Prefect's server code here
    (~3.5 s on 2 cores): it boots in its own process while this one imports the pipeline.
    PREFECT_API_URL then points this process and its children at it; it stops at exit, and
    on its own within a second or two when this process dies without exiting (SIGKILL)."""

    def __init__(self) -> None:
        import prefect
        from prefect.context import refresh_global_settings_context
        from prefect.settings import get_current_settings

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.address = f"http://127.0.0.1:{self.port}"
        env = os.environ | get_current_settings().to_environment_variables(exclude_unset=True) | {
            "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
        self.process: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-c", _UVICORN_WHILE_PARENT_LIVES, str(os.getpid()), "--app-dir",
             str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env, stdin=subprocess.DEVNULL,
        )
        atexit.register(self.stop)
        os.environ["PREFECT_API_URL"] = f"{self.address}/api"
        os.environ.setdefault("PREFECT_UI_URL", "")  # no UI here: no "View at" link to a page that is not served
        refresh_global_settings_context()

    def booting(self) -> bool:
        return self.process is not None and self.process.poll() is None and not _healthy(f"{self.address}/api/health")

    def wait(self, timeout: float) -> None:
        """Until the server answers; StackError if it exits or stays silent for `timeout` s."""
        deadline = time.monotonic() + timeout
        while not _healthy(f"{self.address}/api/health"):
            if self.process is None or self.process.poll() is not None:
                code = self.process.returncode if self.process else "stopped"
                raise StackError(f"Prefect's temporary server exited at start (code {code}); its error is above")
            if time.monotonic() > deadline:
                raise StackError(f"Prefect's temporary server did not answer within {timeout:.0f}s")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            logging.getLogger("prefect").info("Stopping temporary server on %s", self.address)
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def _start(command: list[str], log: Path, env: dict[str, str], user: str | None = None) -> dict:
    handle = open(log, "ab")
    process = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=os.environ | env,
        start_new_session=True, user=user, cwd="/" if user else None,
    )
    handle.close()
    return {"pid": process.pid, "command": command}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie child of this process counts as dead
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _healthy(check: str | list[str] | None) -> bool:
    """A health URL answers 200, a health command exits 0; a process without one is
    healthy while alive."""
    if check is None:
        return True
    if isinstance(check, list):
        return subprocess.run(check, capture_output=True).returncode == 0
    try:
        with urllib.request.urlopen(check, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
