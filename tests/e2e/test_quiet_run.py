"""A successful first run reads as one: no traceback, no native start-up lines.

A real `recflow run` on a brand-new Prefect home (its server database created and migrated
by this run, where Prefect's telemetry heartbeat used to race the migration) and a machine
without a GPU (where TensorFlow's native code logs CUDA discovery straight to stderr).
"""

from __future__ import annotations

import json
import os
import re

import pytest

from tests.conftest import FAST_RUN, RUN_DATE, cli

pytestmark = pytest.mark.slow

NATIVE_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d", re.MULTILINE)  # absl / glog format


def test_a_first_run_on_a_new_prefect_home_prints_no_traceback_and_no_native_noise(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FAST_RUN))
    env = os.environ | {"PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)
    done = cli("run", "--workspace", str(tmp_path / "ws"), "--run-date", str(RUN_DATE), "--config", str(config),
               env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "prefect-home").is_dir()  # the run created its own server database
    for noise in ("Traceback", "database is locked", "Failed to send telemetry", "absl::InitializeLog"):
        assert noise not in done.stderr, f"{noise!r} in the output of a successful run:\n{done.stderr[-3000:]}"
    assert not NATIVE_LOG_LINE.search(done.stderr), NATIVE_LOG_LINE.findall(done.stderr)
    assert "Finished in state Completed()" in done.stderr  # the run's own progress is still shown
