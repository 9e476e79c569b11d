"""Production paths against real servers: `recflow stack up` starts a Prefect server and an
MLflow tracking server on free loopback ports, `recflow serve` serves the deployments, a run
is triggered with `prefect deployment run --param config=<a partial config>` (laid over the
deployment's parameters), and both UIs are opened in headless Chromium."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import polars as pl
import pytest

from tests.conftest import ROOT, SMALL

pytestmark = pytest.mark.slow

RUN_DATE = dt.date(2026, 11, 25)
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("stack")
    ports = {"prefect": _free_port(), "mlflow": _free_port()}
    # alerts go to a webhook nothing listens on: no test here makes a run fail or wait
    started = _cli("stack", "up", "--dir", str(directory), "--prefect-port", str(ports["prefect"]),
                   "--mlflow-port", str(ports["mlflow"]),
                   env=os.environ | {"RECFLOW_ALERT_WEBHOOK_URL": f"http://127.0.0.1:{_free_port()}/hook"})
    try:
        assert started.returncode == 0, started.stderr + started.stdout
        urls = {"prefect": f"http://127.0.0.1:{ports['prefect']}", "mlflow": f"http://127.0.0.1:{ports['mlflow']}"}
        assert f"PREFECT_API_URL={urls['prefect']}/api" in started.stdout
        status = _cli("stack", "status", "--dir", str(directory))
        assert status.returncode == 0 and all(s["healthy"] for s in json.loads(status.stdout).values())
        yield urls
    finally:
        stopped = _cli("stack", "down", "--dir", str(directory))
        assert stopped.returncode == 0, stopped.stderr


def test_stack_up_applies_the_alerts_of_infra_automations_yaml(stack):
    import yaml
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"{stack['prefect']}/api"}), get_client(sync_client=True) as client:
        automations = client.read_automations()
    expected = yaml.safe_load((ROOT / "infra" / "automations.yaml").read_text())["automations"]
    assert sorted(a.name for a in automations) == sorted(spec["name"] for spec in expected)
    assert all(a.enabled and a.actions[0].type == "send-notification" for a in automations)


@pytest.fixture(scope="module")
def served_run(stack, tmp_path_factory):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL, temporary_settings

    workspace = tmp_path_factory.mktemp("served-workspace")
    config = tmp_path_factory.mktemp("config") / "small.json"
    config.write_text(json.dumps({"synthetic": SMALL.model_dump(), "retrieval": {"max_epochs": 4, "batch_size": 512}}))
    env = os.environ | {"PREFECT_API_URL": f"{stack['prefect']}/api", "MLFLOW_TRACKING_URI": stack["mlflow"]}
    log = open(workspace.parent / "serve.log", "w")
    serving = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "serve", "--config", str(config), "--workspace", str(workspace),
         "--timezone", "Europe/Berlin"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        with temporary_settings({PREFECT_API_URL: f"{stack['prefect']}/api"}):
            with get_client(sync_client=True) as client:
                deadline = time.monotonic() + 180
                while True:
                    try:
                        deployment = client.read_deployment_by_name("recflow-nightly/nightly")
                        break
                    except ObjectNotFound:
                        assert serving.poll() is None, (workspace.parent / "serve.log").read_text()
                        assert time.monotonic() < deadline, "the deployment never appeared"
                        time.sleep(1)
                # a partial config, as `prefect deployment run` is usually given one: the fields it
                # names are laid over the deployment's (workspace, source, small data stay)
                partial = json.dumps({"run_date": RUN_DATE.isoformat(), "top_k": 7})
                done = subprocess.run(
                    [os.path.join(os.path.dirname(sys.executable), "prefect"), "deployment", "run",
                     "recflow-nightly/nightly", "--param", f"config={partial}", "--watch", "--watch-timeout", "900"],
                    env=env, capture_output=True, text=True, timeout=960, cwd=workspace.parent,
                )
                assert done.returncode == 0, done.stdout + done.stderr + (workspace.parent / "serve.log").read_text()
                flow_run = client.read_flow_run(re.search(r"UUID: ([0-9a-f-]{36})", done.stdout).group(1))
                artifacts = client.read_artifacts()
                yield {
                    "deployment": deployment,
                    "flow_run": flow_run,
                    "artifacts": [a for a in artifacts if a.flow_run_id == flow_run.id],
                    "workspace": workspace,
                    "urls": stack,
                }
    finally:
        os.killpg(serving.pid, signal.SIGINT)
        try:
            serving.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(serving.pid, signal.SIGKILL)
        log.close()


def _mlflow_run(served_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=served_run["urls"]["mlflow"], registry_uri=served_run["urls"]["mlflow"])
    experiment = client.get_experiment_by_name("recflow")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_served_deployment_has_the_nightly_schedule_and_a_parameters_form(served_run):
    deployment = served_run["deployment"]
    (schedule,) = deployment.schedules
    assert schedule.schedule.cron == "0 2 * * *" and schedule.schedule.timezone == "Europe/Berlin"
    assert schedule.active
    schema = deployment.parameter_openapi_schema
    assert "config" in schema["properties"] and "PipelineConfig" in json.dumps(schema)


def test_a_run_triggered_through_the_api_completes_with_artifacts_mlflow_and_output(served_run):
    flow_run = served_run["flow_run"]
    assert flow_run.state.is_completed(), flow_run.state
    keys = {a.key for a in served_run["artifacts"]}
    assert {"validation", "metrics", "champion-decision", "list-health", "mlflow-run", "mlflow-runs", "nightly-summary"} <= keys
    client, run = _mlflow_run(served_run)
    assert run.data.params["top_k"] == "7" and run.data.params["run_date"] == RUN_DATE.isoformat()
    assert {"ndcg_at_10", "recall_at_10", "popularity_ndcg_at_10", "time_total_s"} <= set(run.data.metrics)
    assert client.get_model_version_by_alias("recflow-retrieval", "champion").run_id == run.info.run_id
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} == {
        "plots/recall_at_k.png", "plots/training.png"
    }
    table = pl.read_parquet(served_run["workspace"] / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    assert table.group_by("user_id").len()["len"].unique().to_list() == [7]


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.fail("headless Chromium is missing: apt-get install chromium chromium-driver (.ci/run does)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(driver), options=options)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    yield session
    session.quit()


def _wait_for_text(browser, text: str, timeout: float = 60) -> None:
    from selenium.webdriver.common.by import By

    deadline = time.monotonic() + timeout
    while text not in browser.find_element(By.TAG_NAME, "body").text:
        assert time.monotonic() < deadline, f"{text!r} never appeared on {browser.current_url}"
        time.sleep(0.5)


def test_prefect_ui_shows_the_runs_metrics_table(served_run, browser):
    from selenium.webdriver.common.by import By

    browser.get(f"{served_run['urls']['prefect']}/runs/flow-run/{served_run['flow_run'].id}")
    _wait_for_text(browser, "Artifacts")
    browser.find_element(By.XPATH, "//li[contains(@class, 'p-tab')][normalize-space()='Artifacts']").click()
    _wait_for_text(browser, "champion-decision")
    browser.find_element(By.XPATH, "//*[contains(@class, 'artifact-card__title')][normalize-space()='metrics']").click()
    _, run = _mlflow_run(served_run)
    value = f"{run.data.metrics['ndcg_at_10']:.4f}"
    _wait_for_text(browser, "ndcg_at_10")
    _wait_for_text(browser, value)
    browser.save_screenshot(str(SCREENSHOTS / "prefect-flow-run-metrics.png"))


def _published_link(served_run, key: str) -> str:
    """The URL of the run's Prefect link artifact `key` (what recflow publishes)."""
    (artifact,) = [a for a in served_run["artifacts"] if a.key == key]
    return re.search(r"https?://[^\s)\]\"]+", str(artifact.data)).group(0)


def test_mlflow_links_open_the_runs_table_with_metric_columns_and_the_run(served_run, browser):
    from selenium.webdriver.common.by import By

    _, run = _mlflow_run(served_run)
    runs = _published_link(served_run, "mlflow-runs")
    assert "workflowType=machine_learning" in runs
    browser.get(runs)
    _wait_for_text(browser, f"nightly-{RUN_DATE}")
    headers = {h.text for h in browser.find_elements(By.XPATH, "//*[@role='columnheader']")}
    assert {"ndcg_at_10", "recall_at_10", "coverage_at_10"} <= headers, headers
    browser.save_screenshot(str(SCREENSHOTS / "mlflow-runs.png"))
    browser.get(_published_link(served_run, "mlflow-run"))
    _wait_for_text(browser, "ndcg_at_10")
    _wait_for_text(browser, str(run.data.metrics["ndcg_at_10"])[:5])  # the UI prints the full value
    assert "Evaluations" not in browser.find_element(By.TAG_NAME, "body").text  # the classic run page
    heading = browser.find_element(By.XPATH, "//*[starts-with(normalize-space(text()), 'Metrics (')]")
    browser.execute_script("arguments[0].scrollIntoView();", heading)
    browser.save_screenshot(str(SCREENSHOTS / "mlflow-run.png"))


def test_the_champion_is_an_mlflow_model_served_by_mlflow_models_serve_with_the_published_lists(served_run, browser):
    """The registry's champion, fetched through the tracking server, answers over HTTP with
    the lists the run published; its version page shows the model's signature."""
    import urllib.request

    client, _ = _mlflow_run(served_run)
    version = client.get_model_version_by_alias("recflow-retrieval", "champion")
    table = pl.read_parquet(served_run["workspace"] / "recommendations" / f"run_date={RUN_DATE}" / "*.parquet")
    users = table["user_id"].unique().sort().head(3).to_list()
    port = _free_port()
    bin_dir = os.path.dirname(sys.executable)
    env = os.environ | {"MLFLOW_TRACKING_URI": served_run["urls"]["mlflow"], "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    log_path = served_run["workspace"].parent / "models-serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [os.path.join(bin_dir, "mlflow"), "models", "serve", "-m", "models:/recflow-retrieval@champion",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(1)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
            data=json.dumps({"dataframe_split": {"columns": ["user_id"], "data": [[user] for user in users]}}).encode(),
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            answered = pl.DataFrame(json.load(response)["predictions"])
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    published = table.filter(pl.col("user_id").is_in(users)).sort("user_id", "rank")
    assert answered.sort("user_id", "rank").select("user_id", "rank", "item_id").equals(
        published.select("user_id", "rank", pl.col("item_id")))
    assert published.group_by("user_id").len()["len"].to_list() == [7] * 3  # the run's top_k is the default k
    browser.get(f"{served_run['urls']['mlflow']}/#/models/recflow-retrieval/versions/{version.version}")
    _wait_for_text(browser, "Inputs (2)")  # the signature: user_id, history -> the list's 7 columns
    _wait_for_text(browser, "Outputs (7)")
    browser.save_screenshot(str(SCREENSHOTS / "mlflow-model-version.png"))
