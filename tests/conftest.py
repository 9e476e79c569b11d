import os

import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.pop("MLFLOW_TRACKING_URI", None)  # tests use the workspace's own sqlite store

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
ML_LATEST_SMALL = os.path.abspath(os.path.join(SHARED, "datasets", "ml-latest-small"))


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect server for every test that runs a flow in-process."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
