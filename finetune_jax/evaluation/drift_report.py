"""The monitor's outputs: `<out>/report.md` (a table of every check, its threshold and
whether it flags drift, then the plots), PNG plots (matplotlib, Agg backend) and
`<out>/drift.json` (the same numbers; no NaN: a missing or undefined value is null)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from finetune_jax.evaluation import drift_statistics
from finetune_jax.evaluation.drift_checks import Check, Sample, accuracy
from finetune_jax.json_values import finite, json_text

_TITLE = "Drift report"


def _number(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.4g}"


def summary(
    checks: Sequence[Check],
    mmd: drift_statistics.MMDResult,
    reference: Sample,
    new: Sample,
    meta: dict,
) -> dict[str, Any]:
    """The drift.json content."""
    return finite(
        {
            **meta,
            "drift": any(c.flagged for c in checks),
            "rows": {"reference": reference.rows, "input": new.rows},
            "checks": [{**_check_dict(c), "flagged": c.flagged} for c in checks],
            "mmd": {
                "mmd2": mmd.mmd2,
                "p_value": mmd.p_value,
                "bandwidth": mmd.bandwidth,
                "permutations": mmd.permutations,
                "rows": list(mmd.sizes),
                "kernel": "rbf, bandwidth = median pairwise distance of the pooled sample",
            },
            "accuracy": {"reference": accuracy(reference), "input": accuracy(new)},
            "smoothing": f"{drift_statistics.SMOOTHING} added to every bin count (PSI, KL)",
        }
    )


def _check_dict(check: Check) -> dict[str, Any]:
    return {
        "statistic": check.statistic,
        "value": check.value,
        "threshold": check.threshold,
        "direction": check.direction,
        "reference": check.reference,
        "input": check.new,
    }


def markdown(result: dict[str, Any], plots: Sequence[str]) -> str:
    """report.md: what was compared, the table of checks, the verdict and the plots."""
    verdict = (
        "**DRIFT**: at least one check is over its threshold"
        if result["drift"]
        else ("no drift: every check is within its threshold")
    )
    lines = [
        f"# {_TITLE}",
        "",
        f"- run: `{result['workdir']}` (checkpoint step {result['step']})",
        f"- reference: `{result['reference']}` ({result['rows']['reference']} rows)",
        f"- input: `{result['input']}` ({result['rows']['input']} rows)",
        f"- {verdict}",
        "",
        "| statistic | reference | input | value | threshold | drift |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["checks"]:
        sign = ">" if c["direction"] == "above" else "<"
        threshold = "n/a" if c["threshold"] is None else f"{sign} {_number(c['threshold'])}"
        lines.append(
            f"| {c['statistic']} | {_number(c['reference'])} | {_number(c['input'])} | "
            f"{_number(c['value'])} | {threshold} | {'**yes**' if c['flagged'] else 'no'} |"
        )
    mmd = result["mmd"]
    lines += [
        "",
        "reference / input: mean tokens per row (length), unknown-token rate, mean top-class "
        "probability (confidence), accuracy. KL is KL(input || reference) in nats. "
        f"PSI / KL smoothing: {result['smoothing']}. MMD: {mmd['kernel']} "
        f"(s = {_number(mmd['bandwidth'])}), MMD^2 = {_number(mmd['mmd2'])} on "
        f"{mmd['rows'][0]} + {mmd['rows'][1]} rows, {mmd['permutations']} permutations.",
        "",
    ]
    lines += [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def plot(out_dir: str, reference: Sample, new: Sample, label_names) -> list[str]:
    """PNG plots into `out_dir`; returns their file names."""
    import matplotlib  # noqa: PLC0415 (only the monitor draws)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    pair = ((reference, "reference"), (new, "input"))
    figures: dict[str, Any] = {}
    if reference.lengths is not None and new.lengths is not None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        top = max(reference.lengths.max(), new.lengths.max()) + 1
        for sample, label in pair:
            ax.hist(
                sample.lengths, bins=np.linspace(0, top, 30), alpha=0.5, density=True, label=label
            )
        ax.set(xlabel="tokens per row", ylabel="density", title="Input length")
        figures["lengths.png"] = fig
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if reference.probs.shape[1] == 1:
        for sample, label in pair:
            ax.hist(sample.probs[:, 0], bins=30, alpha=0.5, density=True, label=label)
        ax.set(xlabel="predicted score", title="Predicted scores")
    else:
        classes = reference.probs.shape[1]
        x = np.arange(classes)
        for offset, (sample, label) in zip((-0.2, 0.2), pair):
            share = np.bincount(sample.probs.argmax(1), minlength=classes) / sample.rows
            ax.bar(x + offset, share, width=0.4, label=label)
        ax.set_xticks(x, list(label_names), rotation=30 if classes > 4 else 0)
        ax.set(ylabel="share of rows", title="Predicted labels")
        figures["predicted_labels.png"] = fig
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for sample, label in pair:
            ax.hist(
                sample.probs.max(1),
                bins=np.linspace(1 / classes, 1, 21),
                alpha=0.5,
                density=True,
                label=label,
            )
        ax.set(xlabel="top class probability", ylabel="density", title="Confidence")
    figures["confidence.png" if reference.probs.shape[1] > 1 else "predicted_scores.png"] = fig
    figures["embeddings.png"] = _pca_figure(plt, reference, new)
    for name, figure in figures.items():
        figure.axes[0].legend()
        figure.tight_layout()
        figure.savefig(os.path.join(out_dir, name), dpi=100)
        plt.close(figure)
    return list(figures)


def _pca_figure(plt, reference: Sample, new: Sample):
    """The pooled features of both samples on their first two principal components."""
    both = np.concatenate([reference.features, new.features]).astype(np.float64)
    centred = both - both.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    fig, ax = plt.subplots(figsize=(5, 5))
    n = len(reference.features)
    ax.scatter(*xy[:n].T, s=6, alpha=0.5, label="reference")
    ax.scatter(*xy[n:].T, s=6, alpha=0.5, label="input")
    ax.set(xlabel="PC 1", ylabel="PC 2", title="Pooled features (PCA)")
    return fig


def write(out_dir: str, result: dict[str, Any], reference: Sample, new: Sample, label_names):
    """Writes the plots, report.md and drift.json (each file replaced whole)."""
    os.makedirs(out_dir, exist_ok=True)
    plots = plot(out_dir, reference, new, label_names)
    for name, text in (
        ("report.md", markdown(result, plots)),
        ("drift.json", json_text(result, indent=2)),
    ):
        tmp = os.path.join(out_dir, f".{name}.tmp-{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, os.path.join(out_dir, name))
