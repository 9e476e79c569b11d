"""The benches' tables in the docs, written from their results files.

Every bench writes its figures to `bench/results/*.json` and then calls `refresh()`, which
renders each table from those files and replaces its block, between `<!-- NAME -->` and
`<!-- /NAME -->`, in README.md (the short summaries), docs/quality.md and docs/performance.md.
No table in the docs is kept true by hand: a test checks that every block is what the
results files say.

    python bench/doctables.py    (rewrite every block from bench/results/)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
OURS = "recflow (as written)"
QUALITY_DATASETS = ["amazon-sports", "ml-latest-small", "synthetic"]  # the development datasets, in table order


def _load(results: Path, name: str) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def quality_table(report: dict) -> str:
    """One dataset's quality report, weakest to strongest, with recflow's ratio to the best baseline."""
    results = report["results"]
    best = _best_classical(results)
    ours = results[OURS]
    rows = ["| model | NDCG@10 | Recall@10 | coverage@10 | popularity ratio | seconds |", "|---|---|---|---|---|---|"]
    for name, v in sorted(results.items(), key=lambda item: item[1]["ndcg"]):
        seconds = f"{v['seconds']:.0f}" if "seconds" in v else "-"
        bold = "**" if v is ours else ""
        rows.append(f"| {bold}{name}{bold} | {bold}{v['ndcg']:.4f}{bold} | {bold}{v['recall']:.4f}{bold} | "
                    f"{v['coverage']:.3f} | {v['popularity_ratio']:.2f} | {seconds} |")
    rows.append(f"\nrecflow / best classical baseline: NDCG@10 {ours['ndcg'] / best[1]['ndcg']:.2f}x, "
                f"Recall@10 {ours['recall'] / best[1]['recall']:.2f}x; {report['users_scored']} users, "
                f"{report['hidden_events']} hidden events.")
    return "\n".join(rows)


def _best_classical(results: dict) -> tuple[str, dict]:
    return max(((n, v) for n, v in results.items() if not n.startswith("recflow")), key=lambda nv: nv[1]["ndcg"])


def repeats_table(off: dict, on: dict) -> str:
    """The same repeat-heavy night scored under the protocol (repeat targets kept), with the
    repeat rule off (today's default) and on."""
    before, after = off["results"][OURS], on["results"][OURS]
    return "\n".join([
        "| recflow's written lists | NDCG@10 | Recall@10 | coverage@10 |", "|---|---|---|---|",
        f"| `lists.repeats` off (default) | {before['ndcg']:.4f} | {before['recall']:.4f} | {before['coverage']:.3f} |",
        f"| `lists.repeats: true` | **{after['ndcg']:.4f}** | **{after['recall']:.4f}** | "
        f"{after['coverage']:.3f} |",
        "",
        f"On / off: NDCG@10 {after['ndcg'] / before['ndcg']:.2f}x, Recall@10 {after['recall'] / before['recall']:.2f}x; "
        f"{on['repeat_targets']} of the {on['hidden_events']} hidden events ({on['repeat_targets'] / on['hidden_events']:.0%}) "
        f"are repeats of an item the user had before; best classical baseline of the same run (seen items "
        f"excluded): {_best_classical(on['results'])[0]}, {_best_classical(on['results'])[1]['ndcg']:.4f}.",
    ])


def quality_summary(reports: dict[str, dict]) -> str:
    """One row per dataset: recflow's written lists against the best classical baseline of the same run."""
    rows = ["| dataset | recflow NDCG@10 | best classical baseline (same run) | its NDCG@10 | ratio | coverage@10 |",
            "|---|---|---|---|---|---|"]
    for name, report in reports.items():
        ours = report["results"][OURS]
        baseline, best = _best_classical(report["results"])
        rows.append(f"| {name} | **{ours['ndcg']:.4f}** | {baseline} | {best['ndcg']:.4f} | "
                    f"{ours['ndcg'] / best['ndcg']:.2f}x | {ours['coverage']:.3f} |")
    return "\n".join(rows)


def beyond_tables(report: dict) -> str:
    """Cold items ranked by retrieval against simple orders, and accuracy against diversity."""
    cold = report["cold_start"]
    rows = [f"New items: {cold['cold_items']} cold items, {cold['users_scored']} users scored; "
            f"{cold['written_lists_with_a_cold_item']:.1%} of the written lists carry one "
            f"({cold['cold_items_in_written_lists']} distinct).", "",
            "| order of the cold items | Recall@10 | NDCG@10 |", "|---|---|---|"]
    for name, v in sorted(cold["recall_among_cold_items"].items(), key=lambda item: item[1]["ndcg"]):
        rows.append(f"| {name} | {v['recall']:.4f} | {v['ndcg']:.4f} |")
    rows += ["", "| `lists.diversity` | NDCG@10 | Recall@10 | intra-list diversity | novelty (bits) | popularity bias |",
             "|---|---|---|---|---|---|"]
    for name, v in report["diversity"].items():
        rows.append(f"| {name.split()[-1]} | {v['ndcg']:.4f} | {v['recall']:.4f} | {v['diversity']:.3f} | "
                    f"{v['novelty']:.2f} | {v['popularity_bias']:.3f} |")
    return "\n".join(rows)


def speed_table(speed: dict) -> str:
    """Training throughput, scoring and ranking, each against a reference of the same run."""
    training, scoring = speed["training"], speed["scoring"]
    ours, tutorial = training["recflow"], training["tfrs_tutorial"]
    return "\n".join([
        "| figure | measured | reference (same run) | ratio |", "|---|---|---|---|",
        f"| retrieval training, examples/s (batch {ours['batch_size']}, dim {ours['embedding_dim']}) | "
        f"{ours['examples_per_second']:,.0f}/s ({ours['step_ms']:.0f} ms/step; input {ours['input_time_share']:.1%} "
        f"of a step) | TFRS basic-retrieval tutorial setup: {tutorial['examples_per_second']:,.0f}/s | "
        f"{training['ratio']:.2f}x |",
        f"| retrieval top-{scoring['top_n']} for every user ({scoring['shape']}), GFLOP/s | "
        f"{scoring['retrieve_gflops']:.1f} ({scoring['peak_block_mib']:.0f} MiB of score blocks) | "
        f"one numpy float32 product of the same shapes: {scoring['numpy_matmul_gflops']:.1f} | {scoring['ratio']:.2f}x |",
        f"| same, against BLAS alone on the same blocks | {scoring['retrieve_gflops']:.1f} | "
        f"{scoring['numpy_blocked_matmul_gflops']:.1f} | {scoring['ratio_to_blocked']:.2f}x |",
        f"| ranker, candidate pairs/s (blocks of {speed['ranking']['block_pairs']:,}) | "
        f"{speed['ranking']['pairs_per_second'] / 1e6:.1f}M/s | - | - |",
    ])


def rerun_table(rerun: dict) -> str:
    """A first run and a rerun of the same date, against the TFRS tutorial model's training."""
    stages = ", ".join(f"{name} {share:.0%}" for name, share in
                       sorted(rerun["first_run_stage_share"].items(), key=lambda item: -item[1]) if share >= 0.02)
    return "\n".join([
        "| figure | measured | reference (same run) | ratio |", "|---|---|---|---|",
        f"| `recflow run`, first run of a date | {rerun['first_run_s']:.0f} s (stages: {stages}; "
        f"{rerun['first_run_non_stage_share']:.0%} outside any stage) | TFRS tutorial model's training, notebook "
        f"settings: {rerun['tutorial_training_s']:.0f} s | {rerun['first_run_to_tutorial']:.2f}x |",
        f"| rerun of the same date, unchanged input | {rerun['rerun_s']:.1f} s, "
        f"{'byte-identical' if rerun['identical_output'] else 'DIFFERENT'} output | first run | {rerun['ratio']:.2f}x |",
    ])


def scale_table(scale: dict, training: dict | None) -> str:
    """Whole runs on growing synthetic data, and a training step's cost as the vocabulary grows."""
    rows = ["| size | interactions | wall time | peak RSS | largest stages | s per M events vs the first size |",
            "|---|---|---|---|---|---|"]
    for run in scale["runs"]:
        stages = sorted(((n, s) for n, s in run["stage_s"].items() if n != "total"), key=lambda item: -item[1])
        largest = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in stages[:4])
        rows.append(f"| {run['size']} ({run['synthetic']['n_users']:,} users, {run['synthetic']['n_items']:,} items) | "
                    f"{run['interactions']:,} | {run['wall_s']:.0f} s | {run['peak_rss_gb']:.1f} GB | {largest} | "
                    f"{run['s_per_million_vs_first']:.2f} |")
    if training:
        rows += ["", f"| training step (batch {training['batch_size']}, median of {training['rounds']} rounds of "
                 f"{training['steps']}) | size | user-id table | step |", "|---|---|---|---|"]
        for run in training["runs"]:
            rows.append(f"| {run['optimiser']} | {run['size']} | {'yes' if run['user_embedding'] else 'no'} | "
                        f"{run['step_ms']:.1f} ms |")
    return "\n".join(rows)


PROJECTED = {"100M": 100e6, "1B": 1e9}  # nights the growth table projects to (interactions)


def growth_table(scale: dict) -> str:
    """Each stage's seconds at the measured sizes, its growth exponent between the two largest
    (seconds grow as interactions^b; users and items grow with the interactions in these
    nights, so b <= 1 is no faster than users + items), and a projection to larger nights of
    the same shape on one such machine at that exponent."""
    runs = sorted(scale["runs"], key=lambda run: run["interactions"])
    if len(runs) < 2:
        return "(needs two sizes)"
    prev, last = runs[-2], runs[-1]
    span = math.log(last["interactions"] / prev["interactions"])
    rows = ["| stage | " + " | ".join(run["size"] for run in runs) + f" | b ({prev['size']} to {last['size']}) | "
            + " | ".join(f"{name} (projected)" for name in PROJECTED) + " |",
            "|---|" + "---|" * (len(runs) + 1 + len(PROJECTED))]
    totals = dict.fromkeys(PROJECTED, 0.0)
    for stage in last["stage_s"]:
        if stage == "total" or last["stage_s"][stage] < 1:
            continue
        b = max(0.0, math.log(max(last["stage_s"][stage], 0.01) / max(prev["stage_s"].get(stage, 0.01), 0.01)) / span)
        projected = {name: last["stage_s"][stage] * (n / last["interactions"]) ** b for name, n in PROJECTED.items()}
        for name in PROJECTED:
            totals[name] += projected[name]
        rows.append(f"| {stage} | " + " | ".join(f"{run['stage_s'].get(stage, 0):,.0f} s" for run in runs)
                    + f" | {b:.2f} | " + " | ".join(_duration(projected[name]) for name in PROJECTED) + " |")
    rows.append("| whole night | " + " | ".join(f"{run['wall_s']:,.0f} s" for run in runs) + " | | "
                + " | ".join(_duration(totals[name]) for name in PROJECTED) + " |")
    return "\n".join(rows)


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def rules_table(rules: dict) -> str:
    """The score stage's work with and without the business rules, same features and models."""
    rows = [f"{rules['size']} ({rules['users']:,} users, {rules['items']:,} items; the night's rules: "
            f"{rules['unservable_items']} unservable items, {rules['exclusions']} exclusions), median of "
            f"{rules['rounds']} rounds:", "", "| scoring | seconds | ratio to no rules |", "|---|---|---|"]
    rows += [f"| {name} | {seconds:.1f} | {rules['ratio_to_no_rules'][name]:.3f}x |"
             for name, seconds in rules["score_s"].items()]
    return "\n".join(rows)


HEALTH_FIGURES = [  # figure, the config field of its threshold, whether the threshold is a maximum
    ("short_lists", "monitoring.max_short_lists", True), ("new_lists", "monitoring.max_new_lists", True),
    ("overlap", "monitoring.min_overlap", False), ("coverage_change", "monitoring.min_coverage_change", False),
    ("popularity_change", "monitoring.max_popularity_change", True), ("score_psi", "monitoring.max_score_psi", True),
    ("new_user_share", "validation.max_new_user_share", True),
    ("new_item_share", "validation.max_new_item_share", True),
    ("events_per_user_kl", "validation.max_events_per_user_kl", True),
    ("category_kl", "validation.max_category_kl", True),
]


def ann_table(reports: dict[str, dict]) -> str:
    """The approximate search against the exact one (bench/ann.py): on each dataset's written
    lists, and on the searches alone on a large catalogue."""
    rows = ["| data | users x items | recall@100 of ann vs exact | top-100 for every user, exact / ann | speed-up | "
            "graph build | NDCG@10 of the written lists, exact / ann |", "|---|---|---|---|---|---|---|"]
    for name, report in reports.items():
        search = report.get("search", report)
        ndcg = (f"{report['exact']['ndcg_at_10']:.4f} / {report['ann']['ndcg_at_10']:.4f} ({report['ndcg_ratio']:.3f}x)"
                if "exact" in report else "-")
        rows.append(f"| {name} | {search['users']:,} x {search['items']:,} | {search['recall_at_100']:.4f} | "
                    f"{search['exact_seconds']:.1f} s / {search['ann_seconds']:.1f} s | {search['speedup']:.2f}x | "
                    f"{search['build_seconds']:.1f} s | {ndcg} |")
    return "\n".join(rows)


def health_table(reports: dict[str, dict]) -> str:
    """Each list-health and drift figure's worst value over each dataset's normal nights,
    next to its default threshold."""
    from schemas.config import PipelineConfig

    defaults = PipelineConfig().model_dump()
    names = list(reports)
    rows = ["| figure | default threshold | " + " | ".join(
        f"{name} ({len(reports[name]['nights'])} nights)" for name in names) + " |",
        "|---|---|" + "---|" * len(names)]
    for figure, field, at_most in HEALTH_FIGURES:
        section, key = field.split(".")
        cells = []
        for name in names:
            values = [night[figure] for night in reports[name]["nights"] if night.get(figure) is not None]
            cells.append(f"{(max if at_most else min)(values):.4f}" if values else "")
        rows.append(f"| {figure} ({'worst: highest' if at_most else 'worst: lowest'}) | `{key}` "
                    f"{defaults[section][key]} | " + " | ".join(cells) + " |")
    rows.append("| nights a new model was promoted (after the first) | | " + " | ".join(
        str(sum(night["promoted"] for night in reports[name]["nights"][1:])) for name in names) + " |")
    rows.append("| every night passes the defaults | | " + " | ".join(
        "yes" if reports[name]["passed"] else "no" for name in names) + " |")
    return "\n".join(rows)


def speed_summary(speed: dict | None, rerun: dict | None, scale: dict | None) -> str:
    rows = ["| figure | measured | ratio to the same run's reference |", "|---|---|---|"]
    if rerun:
        rows.append(f"| `recflow run` on ml-latest-small, first run | {rerun['first_run_s']:.0f} s | "
                    f"{rerun['first_run_to_tutorial']:.2f}x the TFRS tutorial model's training |")
        rows.append(f"| rerun of the same date | {rerun['rerun_s']:.1f} s | {rerun['ratio']:.2f}x the first run |")
    if speed:
        rows.append(f"| retrieval training | {speed['training']['recflow']['examples_per_second']:,.0f} examples/s | "
                    f"{speed['training']['ratio']:.2f}x the TFRS tutorial setup |")
    if scale:
        for run in scale["runs"]:
            rows.append(f"| synthetic {run['size']} interactions, whole run | {run['wall_s'] / 60:.0f} min, "
                        f"{run['peak_rss_gb']:.1f} GB | {run['s_per_million_vs_first']:.2f}x the first size's s/M |")
    return "\n".join(rows)


def blocks(results: Path = RESULTS) -> dict[tuple[Path, str], str]:
    """Every block the benches own: (file, block name) -> its markdown, from the results files."""
    quality = {name: report for name in QUALITY_DATASETS if (report := _load(results, f"quality-{name}.json"))}
    speed, rerun = _load(results, "speed.json"), _load(results, "rerun.json")
    scale, training = _load(results, "scale.json"), _load(results, "scale-training.json")
    rules = _load(results, "scale-rules.json")
    health = {name: report for name in QUALITY_DATASETS if (report := _load(results, f"health-{name}.json"))}
    beyond = _load(results, "beyond-ml-latest-small.json")
    repeats = _load(results, "quality-synthetic-repeats.json"), _load(results, "quality-synthetic-repeats-repeats.json")
    ann = {path.stem.removeprefix("ann-").removeprefix("search-"): json.loads(path.read_text())
           for path in sorted(results.glob("ann-*.json"))}
    ann |= {f"synthetic {run['size']} (bench/scale.py)": run["ann_search"]
            for run in (scale or {}).get("runs", []) if "ann_search" in run}
    out = {(ROOT / "docs" / "quality.md", f"quality:{name}"): quality_table(report) for name, report in quality.items()}
    out[(ROOT / "README.md", "summary:quality")] = quality_summary(quality)
    out[(ROOT / "README.md", "summary:speed")] = speed_summary(speed, rerun, scale)
    if beyond:
        out[(ROOT / "docs" / "quality.md", "beyond:ml-latest-small")] = beyond_tables(beyond)
    if all(repeats):
        out[(ROOT / "docs" / "quality.md", "repeats:synthetic")] = repeats_table(*repeats)
    if speed:
        out[(ROOT / "docs" / "performance.md", "speed")] = speed_table(speed)
    if rerun:
        out[(ROOT / "docs" / "performance.md", "rerun")] = rerun_table(rerun)
    if scale:
        out[(ROOT / "docs" / "performance.md", "scale")] = scale_table(scale, training)
        out[(ROOT / "docs" / "operations.md", "growth")] = growth_table(scale)
    if rules:
        out[(ROOT / "docs" / "performance.md", "rules")] = rules_table(rules)
    if health:
        out[(ROOT / "docs" / "operations.md", "health")] = health_table(health)
    if ann:
        out[(ROOT / "docs" / "performance.md", "ann")] = ann_table(ann)
    return out


def block(document: str, name: str) -> str | None:
    """The text between `<!-- name -->` and `<!-- /name -->`, or None when the document has no such block."""
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if begin not in document or end not in document.split(begin, 1)[1]:
        return None
    return document.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def replace_block(document: str, name: str, text: str) -> str:
    if block(document, name) is None:
        raise ValueError(f"no '<!-- {name} -->' block to write the table into")
    begin, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    head, rest = document.split(begin, 1)
    return f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}"


def refresh(results: Path = RESULTS) -> None:
    """Rewrite every bench table in the docs from the results files."""
    for (path, name), text in blocks(results).items():
        path.write_text(replace_block(path.read_text(), name, text))


def after_writing(results_file: Path) -> None:
    """Called by a bench that just wrote `results_file`: the docs follow when it is one of bench/results/."""
    if results_file.resolve().parent == RESULTS:
        refresh()


if __name__ == "__main__":
    refresh()
    print("tables rewritten from", RESULTS)
