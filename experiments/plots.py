"""The report's PNGs: loss curves per task, and final metric against trainable parameters."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from finetune_jax.evaluation.curves import mean_curve  # noqa: E402


def _eval_split(points: dict[str, dict[str, Any]]) -> str:
    """The eval split the runs logged (from their manifests), "eval" when unknown."""
    for point in points.values():
        for member in point["members"]:
            if member["manifest"]:
                return member["manifest"][-1]["config"]["data"]["eval_split"]
    return "eval"


def loss_plot(task: str, points: dict[str, dict[str, Any]], path: Path) -> Path:
    """Train (solid) and eval-split (dashed) loss vs step, one colour per setting."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (setting, point) in enumerate(points.items()):
        metrics = [m["metrics"] for m in point["members"]]
        color = colors[i % len(colors)]
        label = f"{setting} ({point['point']})"
        steps, loss = mean_curve(metrics, "train")
        ax.plot(steps, loss, color=color, label=label)
        steps, loss = mean_curve(metrics, "eval")
        ax.plot(steps, loss, color=color, linestyle="--", marker="o", markersize=3)
    seeds = sorted({len(p["members"]) for p in points.values()})
    ax.set_title(
        f"{task}: train (solid) and {_eval_split(points)} (dashed) loss\n"
        f"mean of {'/'.join(map(str, seeds))} seeds at the selected lr"
    )
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def metric_plot(task: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Final metric (mean ± std over seeds) against trainable parameters, log x."""
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for i, row in enumerate(rows):
        std = row["final_std"] if np.isfinite(row["final_std"]) else 0.0
        ax.errorbar(row["trainable_params"], row["final_mean"], yerr=std, fmt="o", capsize=3)
        ax.annotate(
            row["setting"],
            (row["trainable_params"], row["final_mean"]),
            textcoords="offset points",
            xytext=(5, 5 if i % 2 == 0 else -12),  # full and llrd share an x
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.1)
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel(f"{rows[0]['metric']} on {rows[0]['final_split']}")
    ax.set_title(f"{task}: final metric vs trainable parameters (mean ± std)")
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_plots(
    selected: dict[tuple[str, str], dict[str, Any]],
    rows: Sequence[dict[str, Any]],
    out_dir: Path,
) -> list[Path]:
    """Per task: `<task>-loss.png` and `<task>-metric-vs-params.png`; their paths."""
    by_task: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for (task, setting), point in selected.items():
        by_task[task][setting] = point
    images = []
    for task, points in by_task.items():
        images.append(loss_plot(task, points, out_dir / f"{task}-loss.png"))
        task_rows = [r for r in rows if r["task"] == task and r["final_mean"] == r["final_mean"]]
        if task_rows:
            images.append(metric_plot(task, task_rows, out_dir / f"{task}-metric-vs-params.png"))
    return images
