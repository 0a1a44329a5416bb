"""Evaluate params over a split's batches: mean loss and the task's metrics, plus what the
task's scorer adds (speech: transcripts and their WER / CER; NER: entity F1).

A scorer is any object with `add(params, device_batch, out, keep)`, called for every batch
with the eval step's host outputs and the real-row mask, and `result() -> (metrics,
records)`, called once at the end: metrics join the eval's, records (one per example) go to
the eval script's per-example file.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from finetune_jax import progress
from finetune_jax.evaluation import metrics as metrics_lib


def evaluate(
    eval_step: Callable,
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    task: Any,
    put_batch: Callable,
    scorer: Any = None,
    records: list[dict[str, Any]] | None = None,
    per_token: bool = False,
    count_key: str = "examples",
    total: int | None = None,
) -> dict[str, float]:
    """Mean loss and the task's metrics over every real (weight > 0) example of `batches`.

    `per_token`: the loss is per target token (a decoder's), so perplexity is reported too.
    `count_key`: the name of the count of weighted units scored ("examples" or "tokens").
    With a `scorer` its metrics are added and, when `records` is given, its per-example
    records appended to it. Progress over the `total` batches shows while it runs.
    """
    loss_sum, weight_sum = 0.0, 0.0
    predictions, labels = [], []
    for batch in progress.track(batches, total, "eval", "batch"):
        device_batch = put_batch(batch)
        out = jax.device_get(eval_step(params, device_batch))
        keep = np.asarray(out["weights"]) > 0  # global rows, not just this process's
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
        predictions.append(np.asarray(out["predictions"])[keep])
        labels.append(np.asarray(out["labels"])[keep])
        if scorer is not None:
            scorer.add(params, device_batch, out, keep)
    if weight_sum == 0:
        raise ValueError("evaluation ran over no examples")
    # The weighted units scored, named by the kind (`count_key`): rows ("examples") or tokens.
    result = {"loss": loss_sum / weight_sum, count_key: int(weight_sum)}
    if per_token:
        result["perplexity"] = math.exp(min(result["loss"], 700.0))  # no overflow to inf
    result.update(
        metrics_lib.compute_metrics(task, np.concatenate(predictions), np.concatenate(labels))
    )
    if scorer is not None:
        scores, scored = scorer.result()
        result.update(scores)
        if records is not None:
            records += scored
    return result
