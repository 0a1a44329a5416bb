"""Evaluation over a split and early stopping on a chosen metric."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np

from finetune_jax import metrics as metrics_lib


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


LOWER_IS_BETTER = ("perplexity",)  # and every "*loss"


def metric_mode(metric: str) -> str:
    """'min' for losses and perplexity, 'max' for the rest (accuracy, F1, correlations)."""
    return "min" if metric.endswith("loss") or metric in LOWER_IS_BETTER else "max"


def eval_metric_names(task) -> tuple[str, ...]:
    """The names an eval of `task` reports, any of which `train.metric` may select on."""
    extra = ("perplexity",) if task.kind == "causal_lm" else ()
    return ("loss", *extra, *task.metrics)


@dataclasses.dataclass
class EarlyStopping:
    """Tracks the best value of one eval metric; stops after `patience` evals without gain."""

    metric: str
    patience: int = 0  # 0: never stop early
    best: float | None = None
    best_step: int | None = None
    bad_evals: int = 0

    def update(self, value: float, step: int) -> bool:
        """Record an eval result; True if it is a new best."""
        sign = -1.0 if metric_mode(self.metric) == "min" else 1.0
        improved = math.isfinite(value) and (self.best is None or sign * value > sign * self.best)
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
        else:
            self.bad_evals += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_evals >= self.patience

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EarlyStopping:
        return cls(**d)
