"""Cleanup: what a successful run removes from earlier runs' files.

Last stage of the nightly DAG, after tonight's MLflow run has finished: only a run that
succeeded removes anything. Users on the deletion list leave the partitions, vocabularies
and models earlier runs wrote (`privacy.forget`), then partitions past
`privacy.retention_days` are pruned (`privacy.prune`).
"""

from __future__ import annotations

from schemas.config import Run
from schemas.tables import Cleanup, ModelDir
from tasks import privacy
from tasks.stage import stage


def clean_up(run: Run, keep: ModelDir) -> Cleanup:
    """Apply the deletion list to earlier runs' files (the models in `keep`, which scored
    tonight, stay), then prune partitions past the retention window."""
    forgotten = privacy.forget(run.workspace, run.config.privacy, keep=keep)
    pruned = privacy.prune(run.workspace, run.run_date, run.config.privacy.retention_days)
    return Cleanup(rewritten=forgotten["rewritten"], removed=forgotten["removed"], pruned=pruned)


cleanup_task = stage("cleanup", clean_up)
