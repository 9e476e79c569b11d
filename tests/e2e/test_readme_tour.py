"""The README's tour works exactly as written on a fresh clone after `make run`.

In a temporary copy of the repository (sharing this checkout's environment), `make run` runs,
then every shell line of the tour's bash blocks and every python block, in order, as a user
would paste them. Lines that need a server (the stack, `serve`, the UIs) are left to
tests/e2e/test_servers.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

NEEDS_A_SERVER = ("recflow stack", ".stack/env", "recflow serve", "mlflow ui")
BLOCK = re.compile(r"```(bash|python)\n(.*?)```", re.DOTALL)


def tour_blocks() -> list[tuple[str, str]]:
    """The (language, code) blocks of the README's tour section, in order."""
    readme = (ROOT / "README.md").read_text()
    tour = readme.split("## A five-minute tour", 1)[1].split("\n## ", 1)[0]
    return BLOCK.findall(tour)


def repository_copy(directory) -> None:
    """The files a clone has (tracked, or new and not ignored), with their times, so make sees
    the shared environment as up to date."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    for name in filter(None, listed.split("\0")):
        if (ROOT / name).is_file():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, directory / name)
    (directory / ".venv").symlink_to(ROOT / ".venv")


def run(command: list[str], cwd, env) -> str:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)!r} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_readme_tour_runs_as_written_after_make_run(tmp_path):
    blocks = tour_blocks()
    shell_lines = [line for language, code in blocks if language == "bash" for line in code.splitlines()
                   if line.strip() and not line.lstrip().startswith("#")]
    runnable = [line for line in shell_lines if not any(marker in line for marker in NEEDS_A_SERVER)]
    assert len(runnable) >= 4 and any(language == "python" for language, _ in blocks), blocks

    repository_copy(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    # -o: the copy shares this checkout's environment; make must not sync it from the copy.
    summary = run(["make", "run", "-o", ".venv/.synced"], tmp_path, env)
    assert '"rows"' in summary and (tmp_path / "workspace" / "recommendations").is_dir()

    outputs = {}
    for language, code in blocks:
        if language == "python":
            outputs[code] = run([str(tmp_path / ".venv" / "bin" / "python"), "-c", code], tmp_path, env)
        for line in code.splitlines() if language == "bash" else []:
            if line in runnable:
                outputs[line] = run(["bash", "-c", line], tmp_path, env)
    recs = next(out for line, out in outputs.items() if "recflow recs user_42" in line)
    explain = next(out for line, out in outputs.items() if "recflow explain user_42" in line)
    assert "item_" in recs and "similar to" in explain
    python_out = next(outputs[code] for language, code in blocks if language == "python")
    # user_42's rows after the tour's `--top-k 10` rerun, then the duckdb summary per run date.
    assert "shape: (10, 4)" in python_out and "mean_score" in python_out, python_out
