"""Learning curves of one run as PNG: `python -m finetune_jax.plot --workdir=... [--out=DIR]`.

Reads `<workdir>/metrics.jsonl` (and `summary.json` / `config.json` for the selection metric)
and writes `loss.png` (train vs eval loss against steps) and `metrics.png` (each eval metric
against steps), the best step marked, into DIR (default `<workdir>/plots`). Works for any task
and for a run still in progress: it plots whatever the run has logged so far.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from absl import app, flags

from finetune_jax.cli import run_main
from finetune_jax.evaluation import curves
from finetune_jax.training import workdir_files


def read_records(workdir: str) -> list[dict[str, Any]]:
    """The metric records of `workdir` (lines cut short by a crash are skipped)."""
    path = workdir_files.workdir_path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: --workdir must be a training run's directory (train "
            "writes metrics.jsonl at its first log step)"
        )
    records = []
    for line in workdir_files.LineFile(path).read():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def run_facts(workdir: str) -> tuple[str | None, str]:
    """(the metric the run selects its best checkpoint on, its eval split), from the run's
    summary.json and config.json (None / "eval" where they do not say)."""
    path = workdir_files.workdir_path(workdir)
    summary = workdir_files.read_json(path / "summary.json") or {}
    config = workdir_files.read_json(path / "config.json") or {}
    metric = summary.get("metric") or config.get("train", {}).get("metric") or None
    return metric, config.get("data", {}).get("eval_split") or "eval"


def plot_run(workdir: str, out_dir: str | None = None) -> list[Path]:
    """Write the run's learning-curve PNGs; returns their paths."""
    records = read_records(workdir)
    out = Path(out_dir or workdir_files.workdir_path(workdir) / "plots")
    out.mkdir(parents=True, exist_ok=True)
    metric, split = run_facts(workdir)
    metric = metric or next(iter(curves.eval_metrics(records)), None)
    best = curves.best_step(records, metric)
    title = f"{Path(workdir).name}" + (f" (best {metric} at step {best})" if best else "")
    loss = curves.loss_figure(records, best, title, eval_split=split)
    paths = [curves.save(loss, out / "loss.png")]
    if curves.eval_metrics(records):
        paths.append(curves.save(curves.metrics_figure(records, best, title), out / "metrics.png"))
    return paths


def main() -> None:
    workdir = flags.DEFINE_string("workdir", None, "Directory of the training run.")
    out = flags.DEFINE_string("out", None, "Directory for the PNGs (default <workdir>/plots).")
    flags.mark_flags_as_required(["workdir"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        for path in plot_run(workdir.value, out.value):
            print(path)

    run_main(run)


if __name__ == "__main__":
    main()
