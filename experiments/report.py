"""Collect a sweep's runs into a result table (markdown + CSV) and plots.

  python -m experiments.report experiments/peft_glue [--quick]

writes `experiments/results/<sweep>.md`, `<sweep>.csv` and `<sweep>/*.png`. For every
(task, setting) the grid point (lr) is selected by the mean over seeds of the selection
metric (`best` in summary.json: the best eval on `data.eval_split`, the holdout); the table
reports that point's final metric (`final` in summary.json: the best checkpoint on
`train.final_split`, dev) as mean ± sample std (ddof=1) over seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import sys
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments import plots
from experiments import sweep as sweep_lib
from experiments.run import config_conflicts, is_finished, read_json
from finetune_jax.evaluation.metrics import metric_mode
from finetune_jax.training import workdir_files
from finetune_jax.training.manifest import read_manifest

CSV_FIELDS = (
    "task",
    "setting",
    "selected",
    "metric",
    "final_split",
    "final_mean",
    "final_std",
    "selection_mean",
    "selection_std",
    "seeds",
    "trainable_params",
    "seconds_per_step",
    "optimizer_state_bytes",
    "peak_host_rss_bytes",
    "peak_device_bytes",
    "final_step",
)


def read_metrics(workdir: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl records; for a step logged twice (a resumed run) the last one wins."""
    path = workdir_files.workdir_path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # blank, or cut short by a killed run: skip the line
            continue
        records[(record["kind"], record["step"])] = record
    return sorted(records.values(), key=lambda r: (r["step"], r["kind"]))


def collect(runs: Sequence[sweep_lib.Run]) -> list[dict[str, Any]]:
    """One dict per run: the run, its summary (None until it ran), metrics, manifest,
    whether it finished, and the config keys it ran with that the sweep no longer has
    (`stale`: such a run is left out of the table)."""
    results = []
    for run in runs:
        config = sweep_lib.build_config(run)
        summary = read_json(workdir_files.workdir_path(run.workdir) / "summary.json")
        results.append(
            {
                "run": run,
                "summary": summary,
                "metrics": read_metrics(run.workdir),
                "manifest": read_manifest(run.workdir),
                "finished": is_finished(summary, config),
                "stale": config_conflicts(run.workdir, config),
            }
        )
    return results


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; nan for fewer than two values)."""
    if not values:
        return math.nan, math.nan
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def _final_value(summary: dict[str, Any]) -> float | None:
    final = summary.get("final") or {}
    return final.get(summary["metric"])


def grid_points(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, setting, point): the seeds' selection and final metrics, mean and std."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for result in results:
        run = result["run"]
        groups[(run.task, run.setting, run.point_name)].append(result)
    points = []
    for (task, setting, point), members in groups.items():
        done = [
            m
            for m in members
            if m["finished"] and not m["stale"] and m["summary"].get("best") is not None
        ]
        selection = [m["summary"]["best"] for m in done]
        finals = [v for v in (_final_value(m["summary"]) for m in done) if v is not None]
        # No train.final_split (a study whose only labelled split is the holdout): the
        # holdout number is the result; the table says so in its split column.
        finals = finals or ([] if any(m["summary"].get("final") for m in done) else selection)
        metric = done[0]["summary"]["metric"] if done else None
        points.append(
            {
                "task": task,
                "setting": setting,
                "point": point,
                "metric": metric,
                "members": done,
                "expected": len(members),
                "selection": mean_std(selection),
                "final": mean_std(finals),
                "final_values": finals,
            }
        )
    return points


def select(points: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The grid point with the best mean selection metric for every (task, setting).

    Ties go to the first point in grid order; points with no finished run are skipped.
    """
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for point in points:
        if not point["members"]:
            continue
        key = (point["task"], point["setting"])
        sign = -1.0 if metric_mode(point["metric"]) == "min" else 1.0
        best = chosen.get(key)
        if best is None or sign * point["selection"][0] > sign * best["selection"][0]:
            chosen[key] = point
    return chosen


def _mean_known(values: Sequence[Any]) -> float:
    known = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(known)) if known else math.nan


def _max_known(values: Sequence[Any]) -> Any:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def table_rows(selected: dict[tuple[str, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, setting) at its selected point: the CSV/markdown table."""
    rows = []
    for (task, setting), point in selected.items():
        summaries = [m["summary"] for m in point["members"]]
        final_split = (summaries[0].get("final") or {}).get("split") or SELECTION_AS_FINAL
        rows.append(
            {
                "task": task,
                "setting": setting,
                "selected": point["point"],
                "metric": point["metric"],
                "final_split": final_split,
                "final_mean": point["final"][0],
                "final_std": point["final"][1],
                "selection_mean": point["selection"][0],
                "selection_std": point["selection"][1],
                "seeds": len(summaries),
                "trainable_params": summaries[0]["trainable_params"],
                "seconds_per_step": _mean_known(
                    [s.get("steady_seconds_per_step") for s in summaries]
                ),
                "optimizer_state_bytes": summaries[0]["optimizer_state_bytes"],
                "peak_host_rss_bytes": _max_known(
                    [s.get("peak_host_rss_bytes") for s in summaries]
                ),
                "peak_device_bytes": _max_known([s.get("peak_device_bytes") for s in summaries]),
                "final_step": max(s["final_step"] for s in summaries),
            }
        )
    return rows


SELECTION_AS_FINAL = "selection split, no final split"


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """The table as CSV, raw numbers (empty where unknown)."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if row[k] is None else row[k] for k in CSV_FIELDS})


def _pm(mean: float, std: float, digits: int = 4) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")


def _bytes(value: Any) -> str:
    if value is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024


def _display_path(path: str) -> str:
    """`path` relative to the repo when inside it."""
    full = Path(path).resolve()
    return str(full.relative_to(sweep_lib.REPO)) if full.is_relative_to(sweep_lib.REPO) else path


def provenance(results: Sequence[dict[str, Any]], sweep_dir: Path) -> dict[str, Any]:
    """Commands, commits, hardware, versions and wall time, from manifests and sweep.jsonl."""
    starts = [m["manifest"][-1] for m in results if m["manifest"]]
    log = []
    if (sweep_dir / "sweep.jsonl").exists():
        log = [json.loads(x) for x in (sweep_dir / "sweep.jsonl").read_text().splitlines() if x]
    names = {r["run"].name for r in results}
    attempts = [e for e in log if "elapsed_s" in e and e["run"] in names]
    ends = [e for e in log if e.get("event") in ("end", "interrupted")]
    hardware = sorted(
        {
            f"{s['host']['cpu_model']} ({s['host']['cpu_count']} cores), "
            f"{s['devices']['device_count']} x {s['devices']['device_kind']} "
            f"({s['devices']['backend']})"
            for s in starts
        }
    )
    commits = sorted(
        {
            f"{s['git']['commit'] or 'unknown'}{' (dirty)' if s['git']['dirty'] else ''}"
            for s in starts
        }
    )
    versions = sorted(
        {", ".join(f"{k} {v}" for k, v in s["packages"].items() if v) for s in starts}
    )
    return {
        "run_commands": sorted({shlex.join(e["command"]) for e in log if "command" in e}),
        "modes": sorted({e["mode"] for e in log if "mode" in e}),
        "commits": commits,
        "hardware": hardware,
        "versions": versions,
        "wall_s": sum(e["wall_s"] for e in ends),
        "invocations": len(ends),
        "runs_s": sum(e["elapsed_s"] for e in attempts),
        "timed_runs": len({e["run"] for e in attempts}),
        "train_wall_s": sum(_loop_seconds(m["summary"]) for m in results if m["summary"]),
        "stale": [m["run"].name for m in results if m["stale"]],
    }


def _loop_seconds(summary: dict[str, Any]) -> float:
    """A run's training-loop seconds: `loop_time_s`, named `wall_time_s` in summaries
    written before it was renamed for what it holds."""
    return summary.get("loop_time_s", summary.get("wall_time_s", 0))


def markdown(
    sweep: sweep_lib.Sweep,
    rows: Sequence[dict[str, Any]],
    points: Sequence[dict[str, Any]],
    info: dict[str, Any],
    images: Sequence[Path],
    out_dir: Path,
    report_command: str,
) -> str:
    """The result page: provenance header, the table, every grid point, the plots."""
    lines = header_lines(sweep, points, info, report_command)
    lines += [
        "",
        "Per (task, setting) the lr is selected by the mean over seeds of the selection metric "
        "(best holdout eval during training); `final` is that lr's runs at their best-on-holdout "
        "checkpoint on the final split. Values are mean ± sample std (ddof=1) over seeds.",
        *(
            [
                "",
                f"Where the split column says '{SELECTION_AS_FINAL}', the runs had no "
                "`train.final_split`: `final` repeats the selection (holdout) number.",
            ]
            if any(r["final_split"] == SELECTION_AS_FINAL for r in rows)
            else []
        ),
        "",
        "| task | setting | selected | final (split, metric) | selection | trainable params "
        "| s/step | optimizer state | peak host RSS | peak device | seeds |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['setting']} | {r['selected']} | "
            f"{_pm(r['final_mean'], r['final_std'])} ({r['final_split']}, {r['metric']}) | "
            f"{_pm(r['selection_mean'], r['selection_std'])} | {r['trainable_params']:,} | "
            f"{r['seconds_per_step']:.3f} | {_bytes(r['optimizer_state_bytes'])} | "
            f"{_bytes(r['peak_host_rss_bytes'])} | {_bytes(r['peak_device_bytes'])} | "
            f"{r['seeds']} |"
        )
    lines += [
        "",
        "## Every grid point",
        "",
        "| task | setting | point | selection | final | seeds |",
        "|---|---|---|---|---|---:|",
    ]
    for p in points:
        lines.append(
            f"| {p['task']} | {p['setting']} | {p['point']} | {_pm(*p['selection'])} | "
            f"{_pm(*p['final'])} | {len(p['members'])}/{p['expected']} |"
        )
    lines += ["", "## Plots", ""]
    lines += [f"![{image.stem}]({image.relative_to(out_dir).as_posix()})" for image in images]
    return "\n".join(lines) + "\n"


def header_lines(
    sweep: sweep_lib.Sweep,
    points: Sequence[dict[str, Any]],
    info: dict[str, Any],
    report_command: str,
) -> list[str]:
    """Where the numbers come from: commands, commit, hardware, versions, time, cuts."""
    missing = sum(p["expected"] - len(p["members"]) for p in points)
    total = sum(p["expected"] for p in points)
    lines = [
        f"# {sweep.name}",
        "",
        f"- Sweep: `{_display_path(sweep.path or sweep.name)}`",
        "- Command: "
        + (
            " / ".join(f"`{c}`" for c in info["run_commands"])
            or "(no sweep.jsonl: runs launched elsewhere)"
        )
        + f", then `{report_command}`",
        f"- Commit: {', '.join(info['commits']) or 'unknown'}",
        f"- Hardware: {'; '.join(info['hardware']) or 'unknown'}",
        f"- Versions: {'; '.join(info['versions']) or 'unknown'}",
        f"- Wall time: {info['wall_s'] / 60:.1f} min in {info['invocations']} runner "
        f"invocation(s); the runs took {info['runs_s'] / 60:.1f} min ({info['timed_runs']} "
        "timed, with loading, compilation, evals, failed and interrupted attempts), their "
        f"training loops {info['train_wall_s'] / 60:.1f} min",
        f"- Runs finished: {total - missing} of {total}",
    ]
    if info["stale"]:
        lines.append(
            f"- Left out, run under an older sweep definition: {', '.join(info['stale'])} "
            "(rerun `experiments.run`, which refuses them, after deleting their workdirs)"
        )
    if sweep.notes:
        lines.append(f"- Cut for speed: {sweep.notes}")
    if "in-process" in info["modes"]:
        lines.append(
            "- Runs shared one process (`experiments.run` default), so peak host RSS and peak "
            "device memory are that process's peaks up to the end of each run; `--isolate` "
            "measures runs alone."
        )
    return lines


def write_report(
    sweep: sweep_lib.Sweep,
    runs_root: Path = sweep_lib.RUNS_ROOT,
    out_dir: Path = sweep_lib.RESULTS_ROOT,
    report_command: str = "python -m experiments.report",
) -> dict[str, Path]:
    """Aggregate the sweep's runs; write `<out>/<sweep>.md`, `.csv` and `<out>/<sweep>/*.png`."""
    results = collect(sweep_lib.expand(sweep, runs_root))
    sweep_dir = workdir_files.workdir_path(runs_root) / sweep.name
    points = grid_points(results)
    selected = select(points)
    if not selected:
        raise FileNotFoundError(
            f"no finished run of sweep {sweep.name} under {sweep_dir}; "
            f"run `python -m experiments.run {sweep.path}{' --quick' if sweep.quick else ''}`"
        )
    rows = table_rows(selected)
    out_dir.mkdir(parents=True, exist_ok=True)
    image_dir = out_dir / sweep.name
    image_dir.mkdir(exist_ok=True)
    images = plots.write_plots(selected, rows, image_dir)
    info = provenance(results, sweep_dir)
    paths = {"md": out_dir / f"{sweep.name}.md", "csv": out_dir / f"{sweep.name}.csv"}
    write_csv(rows, paths["csv"])
    paths["md"].write_text(markdown(sweep, rows, points, info, images, out_dir, report_command))
    return {**paths, **{image.stem: image for image in images}}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.report", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("sweep", help="sweep file, study dir or name (e.g. experiments/peft_glue)")
    parser.add_argument("--quick", action="store_true", help="the sweep's quick variant")
    parser.add_argument(
        "--runs-root", "--runs_root", dest="runs_root", default=str(sweep_lib.RUNS_ROOT)
    )
    parser.add_argument(
        "--out-dir", "--out_dir", dest="out_dir", default=str(sweep_lib.RESULTS_ROOT)
    )
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "experiments.report", *argv])
    try:
        sweep = sweep_lib.load(args.sweep, quick=args.quick)
        runs_root = workdir_files.workdir_path(args.runs_root)  # a local dir or gs:// URL
        paths = write_report(sweep, runs_root, Path(args.out_dir), command)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
