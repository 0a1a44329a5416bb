"""Learning curves of one run (finetune_jax/plot.py, evaluation/curves.py): the PNGs are
written, and the figures hold the run's curves (checked on the figure data, not pixels)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from finetune_jax import plot
from finetune_jax.evaluation import curves
from tests.helpers import REPO

PNG = b"\x89PNG\r\n\x1a\n"


def _overfitting_run(workdir, eval_metrics):
    """A run's files as train writes them: the train loss falls all along, the eval loss
    turns up after step 30 (overfitting), `eval_metrics(step)` gives the other eval values."""
    records = [
        {"step": s, "kind": "train", "loss": 1.0 / s, "lr": 1e-4, "grad_norm": 0.5}
        for s in range(10, 101, 10)
    ]
    for s in range(20, 101, 20):
        loss = 0.5 + abs(s - 40) / 100
        records.append({"step": s, "kind": "eval", "loss": loss, "examples": 40, **eval_metrics(s)})
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (workdir / "config.json").write_text(json.dumps({"data": {"eval_split": "validation"}}))
    return records


def _classification(step):
    accuracy = 0.9 - abs(step - 40) / 200
    return {"accuracy": accuracy, "best": 0.9 if step >= 40 else accuracy}


def test_plot_writes_loss_and_metric_pngs_with_the_run_curves(tmp_path):
    records = _overfitting_run(tmp_path / "run", _classification)
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"metric": "accuracy"}))
    paths = plot.plot_run(str(tmp_path / "run"), str(tmp_path / "out"))
    assert [p.name for p in paths] == ["loss.png", "metrics.png"]
    for path in paths:
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000

    assert curves.best_step(records, "accuracy") == 40
    fig = curves.loss_figure(records, 40, eval_split="validation")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert set(lines) == {"train loss", "validation loss", "best step 40"}
    assert list(lines["train loss"].get_xdata()) == list(range(10, 101, 10))
    assert list(lines["train loss"].get_ydata()) == [1.0 / s for s in range(10, 101, 10)]
    assert list(lines["validation loss"].get_xdata()) == [20, 40, 60, 80, 100]
    assert list(lines["best step 40"].get_xdata()) == [40, 40]

    fig = curves.metrics_figure(records, 40)
    (ax,) = fig.axes
    accuracy = next(line for line in ax.get_lines() if line.get_label() == "eval accuracy")
    assert list(accuracy.get_ydata()) == [
        _classification(s)["accuracy"] for s in range(20, 101, 20)
    ]


def test_plot_shows_whatever_metrics_a_task_logs(tmp_path):
    # A causal LM logs perplexity; a speech run WER and CER; a final eval is a star. Its
    # count of scored tokens is not a metric.
    records = _overfitting_run(
        tmp_path, lambda s: {"wer": 0.3 + s / 1000, "cer": 0.1, "tokens": 400, "best": None}
    )
    records.append({"step": 40, "kind": "final", "wer": 0.25, "cer": 0.08, "tokens": 400})
    assert curves.eval_metrics(records) == ["wer", "cer"]
    assert curves.best_step(records, "wer") is None  # no best recorded: nothing marked
    fig = curves.metrics_figure(records, None)
    assert [ax.get_title() for ax in fig.axes] == ["wer", "cer"]
    final = [line for line in fig.axes[0].get_lines() if line.get_label() == "final wer"]
    assert list(final[0].get_ydata()) == [0.25]
    # null values (NaN written by the JSON writer as null) are left out of a curve
    assert curves.curve([{"step": 1, "kind": "eval", "wer": None}], "eval", "wer") == ([], [])


def test_plot_command_writes_pngs_and_names_a_missing_metrics_file(tmp_path):
    _overfitting_run(tmp_path / "run", _classification)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-m", "finetune_jax.plot", f"--workdir={tmp_path / 'run'}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    plots = tmp_path / "run" / "plots"
    assert result.stdout.split() == [str(plots / "loss.png"), str(plots / "metrics.png")]
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot.plot_run(str(tmp_path / "empty"))
