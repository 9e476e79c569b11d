"""Normal nights against the default thresholds of the list-health gate and the drift checks.

Runs the real `recflow run` on consecutive nights of one dataset in a fresh workspace, with
every list-health and drift threshold off, and records each night's figures: the list
health (tasks/health.py) and the drift (the GE results of the drift suites). It then
reports, for each figure, its worst value over the nights next to the default threshold,
and whether every night would pass with the defaults. The nights: for the synthetic source
(growing one day a night), `--nights` consecutive dates; for a dataset directory, the days
after its last `--nights` days with events, so each night sees new events.

    python bench/health.py synthetic --nights 14
    python bench/health.py ../shared/datasets/ml-latest-small --nights 4
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl

from bench import doctables
from schemas.config import MonitoringConfig, ValidationConfig
from tasks.health import breaches
from tasks.ingest import read_directory

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_START = dt.date(2026, 11, 14)
OFF = {"monitoring": {name: None for name in MonitoringConfig.model_fields},
       "validation": {"max_new_user_share": 1.0, "max_new_item_share": 1.0, "max_events_per_user_kl": 1e9,
                      "max_category_kl": 1e9}}
DRIFT = {"new_user": "new_user_share", "new_item": "new_item_share", "bucket": "events_per_user_kl",
         "category": "category_kl"}  # the drift suites' columns -> the figures


def nights(dataset: str, count: int) -> list[dt.date]:
    if dataset == "synthetic":
        return [SYNTHETIC_START + dt.timedelta(days=day) for day in range(count)]
    interactions, _, _ = read_directory(Path(dataset))
    days = (interactions.select(pl.from_epoch("timestamp").dt.date().unique().sort())
            .to_series().tail(count).to_list())
    return [day + dt.timedelta(days=1) for day in days]


def night(dataset: str, day: dt.date, workspace: Path, config: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "--source", dataset, "--run-date", day.isoformat(),
         "--workspace", str(workspace), "--config", str(config)],
        cwd=ROOT, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise SystemExit(f"{dataset} {day}: {done.stderr.strip().splitlines()[-1]}")
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    found = {"run_date": day.isoformat(), "seconds": summary["time_total_s"], "promoted": summary["promoted"],
             **{name.removeprefix("lists_"): value for name, value in summary.items()
                if name.startswith("lists_") and name != "lists_compared_with"}}
    validation = workspace / "snapshots" / f"run_date={day}" / "validation"
    for results in validation.glob("drift_*.json"):
        found |= {DRIFT[result["expectation_config"]["kwargs"]["column"]]: result["result"]["observed_value"]
                  for result in json.loads(results.read_text())["results"]}
    return found


def verdict(found: dict, top_k: int) -> list[str]:
    """What the default thresholds would have said of one night."""
    validation = ValidationConfig()
    limits = {"new_user_share": validation.max_new_user_share, "new_item_share": validation.max_new_item_share,
              "events_per_user_kl": validation.max_events_per_user_kl, "category_kl": validation.max_category_kl}
    drift = [f"{name} {found[name]:.4f} > {limit:g}" for name, limit in limits.items()
             if name in found and limit is not None and found[name] > limit]
    return drift + breaches(found, MonitoringConfig(), top_k)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", help="'synthetic' or a dataset directory")
    parser.add_argument("--nights", type=int, default=4)
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    name = "synthetic" if args.dataset == "synthetic" else Path(args.dataset).name
    top_k = 10
    with tempfile.TemporaryDirectory() as scratch:
        config = Path(scratch) / "config.json"
        config.write_text(json.dumps(OFF | {"top_k": top_k}))
        rows = []
        for day in nights(args.dataset, args.nights):
            rows.append(night(args.dataset, day, Path(scratch) / "workspace", config))
            rows[-1]["breaches"] = verdict(rows[-1], top_k)
            print(json.dumps(rows[-1]), flush=True)
    report = {"dataset": name, "nights": rows, "passed": all(not row["breaches"] for row in rows)}
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"health-{name}.json"
    path.write_text(json.dumps(report, indent=2))
    print(doctables.health_table({name: report}))
    doctables.after_writing(path)


if __name__ == "__main__":
    main()
