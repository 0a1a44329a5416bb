"""Evaluate params over a split's batches: mean loss and the task's metrics."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from finetune_jax.evaluation import metrics as metrics_lib


def evaluate(
    eval_step: Callable,
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    task: Any,
    put_batch: Callable,
) -> dict[str, float]:
    """Mean loss and the task's metrics over every real (weight 1) example of `batches`."""
    loss_sum, weight_sum = 0.0, 0.0
    predictions, labels = [], []
    for batch in batches:
        out = jax.device_get(eval_step(params, put_batch(batch)))
        keep = np.asarray(out["weights"]) > 0  # global rows, not just this process's
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
        predictions.append(np.asarray(out["predictions"])[keep])
        labels.append(np.asarray(out["labels"])[keep])
    if weight_sum == 0:
        raise ValueError("evaluation ran over no examples")
    # "examples" counts weighted units: rows for classification, trained tokens for an LM.
    result = {"loss": loss_sum / weight_sum, "examples": int(weight_sum)}
    if task.kind == "causal_lm":
        result["perplexity"] = math.exp(min(result["loss"], 700.0))  # no overflow to inf
    result.update(
        metrics_lib.compute_metrics(task, np.concatenate(predictions), np.concatenate(labels))
    )
    return result
