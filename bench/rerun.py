"""End to end: one `recflow run` and a rerun of the same date with unchanged input.

Runs the real `recflow run` twice on one dataset and date in a fresh workspace, each as
its own process (start-up included). For the first run it reports the wall time, each
stage's share of it and the share that is no stage's work (process start, imports,
Prefect's temporary server, MLflow run bookkeeping, shutdown); target: at most 25%. For
the rerun, its wall time against the first run's (target: under a third) and whether the
published partition is byte-for-byte identical.

    python bench/rerun.py DATASET_DIR
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_DATE = "2026-11-27"


def timed_run(source: str, workspace: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--source", source, "--run-date", RUN_DATE,
         "--workspace", str(workspace)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return time.perf_counter() - started, json.loads(result.stdout[result.stdout.index("{"):])


def checksums(partition: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(partition.iterdir())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="a dataset directory, or 'synthetic'")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rerun.json")
    args = parser.parse_args()
    source = args.dataset if args.dataset == "synthetic" else str(Path(args.dataset).resolve())
    with tempfile.TemporaryDirectory() as scratch:
        workspace = Path(scratch) / "ws"
        first_seconds, first = timed_run(source, workspace)
        before = checksums(Path(first["output"]))
        second_seconds, second = timed_run(source, workspace)
        identical = checksums(Path(second["output"])) == before
    stages = {k.removeprefix("time_").removesuffix("_s"): v for k, v in first.items()
              if k.startswith("time_") and k != "time_total_s"}
    report = {
        "dataset": args.dataset,
        "first_run_s": round(first_seconds, 1),
        "first_run_stage_share": {name: round(seconds / first_seconds, 3) for name, seconds in stages.items()},
        "first_run_non_stage_share": round(1 - sum(stages.values()) / first_seconds, 3),
        "target_non_stage_share": 0.25,
        "rerun_s": round(second_seconds, 1),
        "ratio": round(second_seconds / first_seconds, 3),
        "target_ratio": round(1 / 3, 3),
        "identical_output": identical,
        "reused_stages": second["reused_stages"],
        "rerun_stage_seconds": {k: v for k, v in second.items() if k.startswith("time_")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
