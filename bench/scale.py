"""Scale: the real `recflow run` on the synthetic source at 1M, 3M and 10M interactions.

Each size runs in a fresh workspace as its own process; the report gives wall time, the
peak resident memory of the pipeline process, each stage's seconds, and the time per
million interactions against the 1M run (a ratio above 1 would mean faster-than-linear
growth). Targets at 10M (200k users, 50k items) on 2 cores / 24 GB: at most 30 minutes,
peak RSS at most 8 GB.

    python bench/scale.py                 # 1M, 3M and 10M (about 35 minutes here)
    python bench/scale.py --sizes 1M      # one size
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUN_DATE = "2026-11-27"
# ~60 events per user on average before de-duplication gives ~1.0, 3.0 and 10.7M interactions.
SIZES = {
    "1M": {"n_users": 20_000, "n_items": 5_000, "events_per_user": 60},
    "3M": {"n_users": 60_000, "n_items": 15_000, "events_per_user": 60},
    "10M": {"n_users": 200_000, "n_items": 50_000, "events_per_user": 60},
}


def run_size(name: str, workspace: Path, log: Path) -> dict:
    """One `recflow run` in a child process; peak RSS is the child's (children are waited one by one)."""
    config = workspace.parent / f"{name}.json"
    config.write_text(json.dumps({"source": "synthetic", "synthetic": SIZES[name]}))
    started = time.perf_counter()
    with log.open("w") as stderr:
        result = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(config), "--run-date", RUN_DATE,
             "--workspace", str(workspace)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
        )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name}: recflow run failed; its log is {log}")
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    return {
        "size": name,
        "synthetic": SIZES[name],
        "interactions": _interactions(workspace),
        "wall_s": round(seconds, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 2),
        "stage_s": {k.removeprefix("time_").removesuffix("_s"): v for k, v in summary.items() if k.startswith("time_")},
        "ndcg_at_10": summary.get("ndcg_at_10"),
        "popularity_ndcg_at_10": summary.get("popularity_ndcg_at_10"),
    }


def _interactions(workspace: Path) -> int:
    import polars as pl

    snapshot = next((workspace / "snapshots").glob("run_date=*")) / "interactions.parquet"
    return pl.scan_parquet(snapshot).select(pl.len()).collect().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,3M,10M", help="comma-separated, of " + ", ".join(SIZES))
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "scale.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one size in this process
    args = parser.parse_args()
    if args.one:
        with tempfile.TemporaryDirectory() as scratch:
            print(json.dumps(run_size(args.one, Path(scratch) / "ws", args.out.with_name(f"scale-{args.one}.log"))))
        return
    rows = []
    for name in args.sizes.split(","):
        # A process per size, so each peak RSS is that size's own.
        child = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--one", name, "--out", str(args.out)],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]
    for row in rows:
        row["s_per_million_vs_first"] = round(
            (row["wall_s"] / row["interactions"]) / (base["wall_s"] / base["interactions"]), 3
        )
    report = {"machine": _machine(), "runs": rows,
              "targets": {"10M_wall_s": 1800, "10M_peak_rss_gb": 8, "growth": "s_per_million_vs_first <= 1"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


def _machine() -> str:
    import os
    import platform

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores, {memory:.0f} GiB, {platform.processor() or platform.machine()}, Python {platform.python_version()}"


if __name__ == "__main__":
    main()
