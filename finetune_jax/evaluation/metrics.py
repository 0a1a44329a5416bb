"""Host-side evaluation metrics on numpy arrays (GLUE conventions).

Degenerate inputs (a constant predictor, a constant target) give 0.0 rather than NaN, so a
collapsed model scores as uninformative instead of breaking keep-best checkpoint selection.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from finetune_jax.data.text_tasks import Task


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the labels."""
    predictions, labels = _check(predictions, labels)
    return float(np.mean(predictions == labels))


def f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class 1; 0.0 when there are no true or predicted positives."""
    predictions, labels = _check(predictions, labels)
    true_positive = np.sum((predictions == 1) & (labels == 1))
    denominator = np.sum(predictions == 1) + np.sum(labels == 1)
    return float(2 * true_positive / denominator) if denominator else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (multiclass form, as scikit-learn); 0.0 for a constant predictor."""
    predictions, labels = _check(predictions, labels)
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    k = len(classes)
    confusion = np.zeros((k, k), np.float64)
    np.add.at(confusion, (encoded[: len(labels)], encoded[len(labels) :]), 1.0)
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    samples, correct = confusion.sum(), np.trace(confusion)
    covariance_yp = correct * samples - true_counts @ predicted_counts
    covariance_pp = samples**2 - predicted_counts @ predicted_counts
    covariance_yy = samples**2 - true_counts @ true_counts
    if covariance_pp == 0 or covariance_yy == 0:
        return 0.0
    return float(covariance_yp / np.sqrt(covariance_pp * covariance_yy))


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; 0.0 when either side is constant."""
    predictions, labels = _check(predictions, labels)
    x = predictions.astype(np.float64) - predictions.mean(dtype=np.float64)
    y = labels.astype(np.float64) - labels.mean(dtype=np.float64)
    norm = np.sqrt(np.sum(x * x) * np.sum(y * y))
    return float(np.clip(np.sum(x * y) / norm, -1.0, 1.0)) if norm > 0 else 0.0


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); 0.0 when either side is constant."""
    predictions, labels = _check(predictions, labels)
    import scipy.stats  # noqa: PLC0415 (60 MB of imports, for STS-B's metric alone)

    return pearson(scipy.stats.rankdata(predictions), scipy.stats.rankdata(labels))


def _indicators(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boolean [N, C] indicators: multi-hot rows as they are; class ids one-hot over the
    classes that occur in either (scikit-learn's label set for 1-D inputs)."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions of shape {predictions.shape} but labels {labels.shape}")
    if predictions.size == 0:
        raise ValueError("metrics of an empty set are undefined")
    if predictions.ndim == 2:
        return predictions > 0.5, labels > 0.5
    classes = np.unique(np.concatenate([labels, predictions]))
    return predictions[:, None] == classes, labels[:, None] == classes


def _f1(true_positive, predicted, actual) -> np.ndarray:
    """2 TP / (predicted + actual), 0 where both counts are 0 (scikit-learn's zero_division=0)."""
    denominator = predicted + actual
    return np.where(denominator > 0, 2 * true_positive / np.maximum(denominator, 1), 0.0)


def micro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """F1 over all (row, class) decisions pooled; equals accuracy for single-label ids."""
    p, y = _indicators(predictions, labels)
    return float(_f1(np.sum(p & y), np.sum(p), np.sum(y)))


def macro_f1(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 scores (rare classes count as much as common)."""
    p, y = _indicators(predictions, labels)
    return float(np.mean(_f1(np.sum(p & y, 0), np.sum(p, 0), np.sum(y, 0))))


def subset_accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose whole predicted label set is exactly right."""
    p, y = _indicators(predictions, labels)
    return float(np.mean(np.all(p == y, axis=1)))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": accuracy,
    "token_accuracy": accuracy,  # next-token argmax vs target, over trained tokens
    "f1": f1,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
    "micro_f1": micro_f1,
    "macro_f1": macro_f1,
    "subset_accuracy": subset_accuracy,
}


def compute_metrics(task: Task, predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """All of `task.metrics` for predictions vs labels: class ids, multi-hot rows
    [N, num_labels] (multi-label), or floats (regression)."""
    unknown = [name for name in task.metrics if name not in METRICS]
    if unknown:
        raise ValueError(
            f"task {task.name} asks for unknown metrics {unknown}; known: {sorted(METRICS)}"
        )
    return {name: METRICS[name](predictions, labels) for name in task.metrics}


def _check(predictions: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions).ravel(), np.asarray(labels).ravel()
    if predictions.shape != labels.shape:
        raise ValueError(f"{predictions.size} predictions but {labels.size} labels")
    if predictions.size == 0:
        raise ValueError("metrics of an empty set are undefined")
    return predictions, labels


LOWER_IS_BETTER = ("perplexity", "wer", "cer")  # and every "*loss"


def metric_mode(metric: str) -> str:
    """'min' for losses, perplexity and error rates, 'max' for the rest (accuracy, F1,
    correlations)."""
    return "min" if metric.endswith("loss") or metric in LOWER_IS_BETTER else "max"
