"""The stage cache: a key that sees every code change, records that follow their workspace; tables written block by block."""

from __future__ import annotations

import subprocess
import sys

import polars as pl
import pyarrow.parquet as pq

from schemas.tables import FeatureSet
from tasks import workspace
from tasks.workspace import reuse, stamp, write_parquet_blocks
from tests.conftest import git, source_tree


def code_version_of(tree) -> str:
    return subprocess.run([sys.executable, "-c", "from tasks.workspace import code_version; print(code_version())"],
                          cwd=tree, capture_output=True, text=True, check=True).stdout.strip()


def test_the_code_version_changes_with_any_source_edit_with_or_without_git(tmp_path):
    tree = source_tree(tmp_path)
    shipped = code_version_of(tree)
    with open(tree / "tasks" / "lists.py", "a") as edited:
        edited.write("\n# an edit\n")
    assert code_version_of(tree) != shipped  # no .git: the deployed case

    git(tree, "init", "-q")
    git(tree, "add", "-A")
    git(tree, "commit", "-q", "-m", "snapshot")
    committed = code_version_of(tree)
    (tree / "schemas" / "new_module.py").write_text('"""An uncommitted new file."""\n')
    assert code_version_of(tree) != committed  # uncommitted: still a different version
    (tree / "schemas" / "new_module.py").unlink()
    assert code_version_of(tree) == committed  # the same files give the same version


def test_a_reused_record_points_at_the_directory_it_was_found_in(tmp_path):
    record = FeatureSet(key="k1", path=tmp_path / "old" / "features", n_users=1, n_items=2, n_categories=0,
                        n_title_tokens=0, split_sizes={"fit": 3}, seconds=4.0)
    stamp(tmp_path / "moved", record)  # as if the workspace had moved since

    found = reuse(tmp_path / "moved", "k1", FeatureSet)

    assert found.reused and found.path == tmp_path / "moved" and found.split_sizes == {"fit": 3}
    assert found.seconds == 0.0  # how long a run took is never stored
    assert reuse(tmp_path / "moved", "another key", FeatureSet) is None
    assert reuse(tmp_path / "elsewhere", "k1", FeatureSet) is None


def test_blocks_are_written_in_order_as_one_file_of_bounded_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(workspace, "ROW_GROUP", 10)
    schema = pl.Schema({"user": pl.Int32, "name": pl.String})
    blocks = [pl.DataFrame({"user": range(start, start + size), "name": [f"u{start}"] * size}, schema=schema)
              for start, size in ((0, 4), (4, 7), (11, 0), (11, 12), (23, 3))]
    path = write_parquet_blocks(iter(blocks), schema, tmp_path / "part.parquet")
    assert pl.read_parquet(path).equals(pl.concat(blocks))
    assert [pq.ParquetFile(path).metadata.row_group(i).num_rows for i in range(3)] == [11, 12, 3]
    empty = write_parquet_blocks(iter([]), schema, tmp_path / "empty.parquet")
    assert pl.read_parquet(empty).schema == schema and pl.read_parquet(empty).is_empty()
    assert not list(tmp_path.glob(".*"))  # no temporary file left
