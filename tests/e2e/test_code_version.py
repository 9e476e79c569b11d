"""A code change retrains: the stage cache key holds a hash of every shipped source file.

Real `recflow run` processes from a copy of the source tree, run twice on the same date and
workspace with an edit in between: once in a git checkout with the edit left uncommitted,
once in a tree without git history (as in a Docker image).
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import FAST_RUN, RUN_DATE, cli, git, source_tree

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("history", ["uncommitted edit in a git checkout", "no git history"])
def test_editing_any_source_file_and_rerunning_the_date_retrains_instead_of_reusing(tmp_path, history):
    tree = source_tree(tmp_path / "recflow")
    if history.startswith("uncommitted"):
        git(tree, "init", "-q")
        git(tree, "add", "-A")
        git(tree, "commit", "-q", "-m", "deployed")
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FAST_RUN))

    def run() -> dict:
        done = cli("run", "--workspace", str(tmp_path / "ws"), "--run-date", str(RUN_DATE), "--config", str(config),
                   cwd=tree, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout[done.stdout.index("{"):])

    first, unchanged = run(), run()
    assert unchanged["reused_stages"] == ["ingest", "validate", "features", "train_retrieval", "select",
                                          "train_ranking", "score", "publish"]
    with open(tree / "tasks" / "ranking.py", "a") as edited:
        edited.write("\n# a change to the code that trains the ranker\n")
    changed = run()
    assert changed["reused_stages"] == []
    assert changed["model_key"] != first["model_key"]
