"""The servers the flows talk to outside embedded mode, and the deployments served to them.

`up` starts a real Prefect server and a real MLflow tracking server (sqlite backends, local
artifact root) on one host, as background processes whose state and logs live in one
directory; `down` stops them; `status` checks them. `TemporaryPrefect` is the server of one
command in ephemeral mode. `serve_deployments` registers the
nightly flow (on a cron schedule) and the backfill flow with the Prefect server and runs
whatever the schedule or the UI asks for in this process.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from schemas.config import PipelineConfig

BIN = Path(sys.executable).parent
STATE = "stack.json"


class StackError(Exception):
    """A server that would not start, or a stack that is not there."""


def up(directory: Path, host: str, prefect_port: int, mlflow_port: int, timeout: float = 180) -> dict[str, str]:
    """Start both servers (unless already up) and wait until they answer; return their URLs."""
    running = status(directory)
    if running and all(server["healthy"] for server in running.values()):
        return {name: server["url"] for name, server in running.items()}
    directory.mkdir(parents=True, exist_ok=True)
    prefect_url, mlflow_url = f"http://{host}:{prefect_port}/api", f"http://{host}:{mlflow_port}"
    servers = {
        "prefect": _start(
            [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(prefect_port)],
            directory / "prefect.log",
            {"PREFECT_HOME": str(directory / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
             # the UI asks the API at this address, whatever --port says
             "PREFECT_UI_API_URL": prefect_url, "PREFECT_SERVER_API_HOST": host,
             "PREFECT_SERVER_API_PORT": str(prefect_port)},
        )
        | {"url": prefect_url, "health": f"{prefect_url}/health"},
        "mlflow": _start(
            [str(BIN / "mlflow"), "server", "--host", host, "--port", str(mlflow_port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
             "--artifacts-destination", str(directory / "mlartifacts")],
            directory / "mlflow.log",
            {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        | {"url": mlflow_url, "health": f"{mlflow_url}/health"},
    }
    (directory / STATE).write_text(json.dumps(servers, indent=2))
    deadline = time.monotonic() + timeout
    for name, server in servers.items():
        while not _healthy(server["health"]):
            if not _alive(server["pid"]):
                down(directory)
                raise StackError(f"{name} server exited at start; see {directory / (name + '.log')}")
            if time.monotonic() > deadline:
                down(directory)
                raise StackError(f"{name} server did not answer within {timeout:.0f}s; see {directory / (name + '.log')}")
            time.sleep(1)
    (directory / "env").write_text(f"export PREFECT_API_URL={prefect_url}\nexport MLFLOW_TRACKING_URI={mlflow_url}\n")
    return {"prefect": prefect_url, "mlflow": mlflow_url}


def down(directory: Path) -> str:
    """Stop both servers (their whole process groups); their data stays in `directory`."""
    state = directory / STATE
    if not state.exists():
        return f"no stack in {directory}"
    for server in json.loads(state.read_text()).values():
        if _alive(server["pid"]):
            os.killpg(server["pid"], signal.SIGTERM)
    for server in json.loads(state.read_text()).values():
        for _ in range(30):
            if not _alive(server["pid"]):
                break
            time.sleep(0.5)
        else:
            os.killpg(server["pid"], signal.SIGKILL)
    state.unlink()
    return f"stack in {directory} stopped"


def status(directory: Path) -> dict[str, dict]:
    """Each server's URL, pid, and whether it is alive and answering."""
    state = directory / STATE
    if not state.exists():
        return {}
    servers = json.loads(state.read_text())
    return {
        name: {"url": s["url"], "pid": s["pid"], "alive": _alive(s["pid"]), "healthy": _healthy(s["health"])}
        for name, s in servers.items()
    }


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


class TemporaryPrefect:
    """Prefect's temporary server for one command in ephemeral mode (no PREFECT_API_URL),
    started as Prefect starts it (its API app under uvicorn, on a free loopback port, UI
    off, this process's Prefect settings) but without importing Prefect's server code here
    (~3.5 s on 2 cores): it boots in its own process while this one imports the pipeline.
    PREFECT_API_URL then points this process and its children at it; it stops at exit."""

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
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
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


def _start(command: list[str], log: Path, env: dict[str, str]) -> dict:
    handle = open(log, "ab")
    process = subprocess.Popen(
        command, stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=os.environ | env,
        start_new_session=True,
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


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
