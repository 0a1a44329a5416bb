"""Evaluate params over a split's batches: mean loss and the task's metrics; for seq2seq
tasks also greedy transcripts of every example and their WER / CER."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from finetune_jax.evaluation import metrics as metrics_lib
from finetune_jax.evaluation import wer


def evaluate(
    eval_step: Callable,
    params: Any,
    batches: Iterable[dict[str, np.ndarray]],
    task: Any,
    put_batch: Callable,
    transcriber: Any = None,
    transcripts: list[dict[str, str]] | None = None,
) -> dict[str, float]:
    """Mean loss and the task's metrics over every real (weight > 0) example of `batches`.

    With a `transcriber` (seq2seq tasks) every real row is also transcribed greedily and
    scored against the reference its labels spell; `transcripts`, when given, receives one
    {"reference", "hypothesis"} record per row, in order.
    """
    loss_sum, weight_sum = 0.0, 0.0
    predictions, labels = [], []
    references, hypotheses = [], []
    for batch in batches:
        device_batch = put_batch(batch)
        out = jax.device_get(eval_step(params, device_batch))
        keep = np.asarray(out["weights"]) > 0  # global rows, not just this process's
        loss_sum += float(out["loss_sum"])
        weight_sum += float(out["weight_sum"])
        predictions.append(np.asarray(out["predictions"])[keep])
        labels.append(np.asarray(out["labels"])[keep])
        if transcriber is not None:
            tokens = transcriber.tokens(params, device_batch["input_features"])
            real = keep.any(axis=1)  # filler rows of the last batch have no trained token
            references += transcriber.references(out["labels"][real], out["weights"][real])
            hypotheses += transcriber.texts(tokens[real])
    if weight_sum == 0:
        raise ValueError("evaluation ran over no examples")
    # "examples" counts weighted units: rows for classification, trained tokens for an LM.
    result = {"loss": loss_sum / weight_sum, "examples": int(weight_sum)}
    if task.kind in metrics_lib.TOKEN_KINDS:
        result["perplexity"] = math.exp(min(result["loss"], 700.0))  # no overflow to inf
    result.update(
        metrics_lib.compute_metrics(task, np.concatenate(predictions), np.concatenate(labels))
    )
    if transcriber is not None:
        result.update(wer.error_rates(references, hypotheses))
        result["transcribed"] = len(hypotheses)
        if transcripts is not None:
            transcripts += [
                {"reference": r, "hypothesis": h} for r, h in zip(references, hypotheses)
            ]
    return result
