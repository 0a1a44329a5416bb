"""Learning curves from a run's `metrics.jsonl` records (training/metric_files.py): train vs
eval loss against steps, and every eval metric against steps, with the selected (best) step
marked, so overfitting shows at a glance. Also the curve helpers the sweep plots share
(experiments/plots.py). Figures are matplotlib's Agg: files only, no display."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

# Eval record fields that are bookkeeping, not metrics to plot.
NOT_METRICS = frozenset({"step", "kind", "best", "examples", "tokens", "loss", "split"})


def curve(records: Sequence[dict[str, Any]], kind: str, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of `kind`, skipping steps where it is null."""
    points = [
        (r["step"], float(r[key]))
        for r in records
        if r["kind"] == kind and isinstance(r.get(key), (int, float))
    ]
    return [s for s, _ in points], [v for _, v in points]


def mean_curve(
    metrics_per_seed: Sequence[Sequence[dict[str, Any]]], kind: str, key: str = "loss"
) -> tuple[list[int], list[float]]:
    """Steps logged by every seed (records of `kind`) and the mean of `key` there."""
    per_seed = [dict(zip(*curve(records, kind, key))) for records in metrics_per_seed]
    if not per_seed:
        return [], []
    steps = sorted(set.intersection(*(set(c) for c in per_seed)))
    return steps, [float(np.mean([c[s] for c in per_seed])) for s in steps]


def eval_metrics(records: Sequence[dict[str, Any]]) -> list[str]:
    """Names of the numeric eval metrics the records hold (besides loss), in logged order."""
    names: dict[str, None] = {}
    for r in records:
        if r["kind"] == "eval":
            for k, v in r.items():
                if k not in NOT_METRICS and isinstance(v, (int, float)):
                    names[k] = None
    return list(names)


def best_step(records: Sequence[dict[str, Any]], metric: str | None) -> int | None:
    """The step whose eval was the best by `metric` (the first eval to reach the recorded
    best, as checkpoint selection picks it); None when unknown."""
    evals = [r for r in records if r["kind"] == "eval"]
    if not metric or not evals or not isinstance(evals[-1].get("best"), (int, float)):
        return None
    best = evals[-1]["best"]
    return next((r["step"] for r in evals if r.get(metric) == best), None)


def loss_figure(
    records: Sequence[dict[str, Any]], best: int | None, title: str = "", eval_split: str = "eval"
):
    """Train loss (solid) and `eval_split` loss (dashed, markers) against steps; the best
    step as a vertical line. An eval loss rising while the train loss falls is overfitting."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(*curve(records, "train", "loss"), label="train loss")
    steps, loss = curve(records, "eval", "loss")
    if steps:
        ax.plot(steps, loss, linestyle="--", marker="o", markersize=3, label=f"{eval_split} loss")
    _mark_best(ax, best)
    _finish(ax, title or "loss", "loss")
    return fig


def metrics_figure(records: Sequence[dict[str, Any]], best: int | None, title: str = ""):
    """One panel per eval metric against steps (the final eval, if any, as a star)."""
    names = eval_metrics(records)
    fig, axes = plt.subplots(
        len(names), 1, figsize=(7, 2.8 * len(names)), squeeze=False, sharex=True
    )
    for ax, name in zip(axes[:, 0], names):
        ax.plot(*curve(records, "eval", name), marker="o", markersize=3, label=f"eval {name}")
        final_steps, final = curve(records, "final", name)
        if final_steps:
            ax.plot(final_steps, final, "*", markersize=10, label=f"final {name}")
        _mark_best(ax, best)
        _finish(ax, name, name)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig, path: Path) -> Path:
    """Write `fig` as PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mark_best(ax, best: int | None) -> None:
    if best is not None:
        ax.axvline(best, color="gray", linestyle=":", label=f"best step {best}")


def _finish(ax, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
