"""Metrics agree with scikit-learn / scipy on random data and stay finite when degenerate."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

from finetune_jax import tasks
from finetune_jax.data import text_tasks
from finetune_jax.evaluation import metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")

SEEDS = range(5)


def _classes(seed: int, n: int = 200, k: int = 2):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    # Predictions correlated with labels, so the metrics are not all near chance.
    predictions = np.where(rng.random(n) < 0.7, labels, rng.integers(0, k, n))
    return predictions, labels


def _scores(seed: int, n: int = 300, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.uniform(0, 5, n)
    predictions = labels + rng.normal(0, 1.5, n)
    if ties:  # STS-B scores come in steps of 0.2: many ties
        labels, predictions = np.round(labels * 5) / 5, np.round(predictions)
    return predictions.astype(np.float32), labels.astype(np.float32)


@pytest.mark.parametrize("seed", SEEDS)
def test_classification_metrics_match_sklearn(seed):
    predictions, labels = _classes(seed)
    assert metrics.accuracy(predictions, labels) == pytest.approx(
        sklearn_metrics.accuracy_score(labels, predictions)
    )
    assert metrics.f1(predictions, labels) == pytest.approx(
        sklearn_metrics.f1_score(labels, predictions)
    )
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions)
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_multiclass_mcc_matches_sklearn(seed):
    predictions, labels = _classes(seed, k=4)
    assert metrics.matthews_corrcoef(predictions, labels) == pytest.approx(
        sklearn_metrics.matthews_corrcoef(labels, predictions)
    )


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ties", [False, True])
def test_correlations_match_scipy(seed, ties):
    predictions, labels = _scores(seed, ties=ties)
    assert metrics.pearson(predictions, labels) == pytest.approx(
        scipy.stats.pearsonr(predictions, labels).statistic, abs=1e-6
    )
    assert metrics.spearman(predictions, labels) == pytest.approx(
        scipy.stats.spearmanr(predictions, labels).statistic, abs=1e-6
    )


def test_regression_predictions_may_have_a_trailing_axis():
    predictions, labels = _scores(0)
    expected = metrics.pearson(predictions, labels)
    assert metrics.pearson(predictions[:, None], labels) == pytest.approx(expected)


def test_degenerate_inputs_give_zero_not_nan():
    labels = np.array([0, 1, 1, 0, 1])
    constant = np.ones(5, np.int64)
    assert metrics.matthews_corrcoef(constant, labels) == 0.0
    assert metrics.matthews_corrcoef(labels, constant) == 0.0
    assert metrics.f1(np.zeros(5), np.zeros(5)) == 0.0  # no positives anywhere
    assert metrics.pearson(np.full(5, 2.5), labels) == 0.0
    assert metrics.spearman(np.full(5, 2.5), labels) == 0.0
    assert metrics.matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert metrics.pearson(labels, labels) == pytest.approx(1.0)


def test_shape_mismatch_and_empty_input_raise():
    with pytest.raises(ValueError):
        metrics.accuracy(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        metrics.accuracy(np.zeros(0), np.zeros(0))


@pytest.mark.parametrize("name", sorted(text_tasks.TASKS))
def test_compute_metrics_reports_every_task_metric(name):
    task = tasks.get_task(name)
    predictions, labels = _scores(1) if task.is_regression else _classes(1)
    result = metrics.compute_metrics(task, predictions, labels)
    assert list(result) == list(task.metrics) and task.main_metric in result
    for metric_name, value in result.items():
        assert isinstance(value, float) and np.isfinite(value)
        assert value == metrics.METRICS[metric_name](predictions, labels)


def _multi_hot(seed: int, n: int = 200, k: int = 5):
    rng = np.random.default_rng(seed)
    labels = rng.random((n, k)) < rng.uniform(0.05, 0.6, k)  # rare and common classes
    flips = rng.random((n, k)) < 0.2
    labels[:, -1] = False  # a class nobody has: F1 0 (zero_division=0), still averaged
    return np.where(flips, ~labels, labels).astype(np.int32), labels.astype(np.float32)


@pytest.mark.parametrize("seed", SEEDS)
def test_multi_label_metrics_match_sklearn(seed):
    predictions, labels = _multi_hot(seed)
    assert metrics.micro_f1(predictions, labels) == pytest.approx(
        sklearn_metrics.f1_score(labels, predictions, average="micro", zero_division=0)
    )
    assert metrics.macro_f1(predictions, labels) == pytest.approx(
        sklearn_metrics.f1_score(labels, predictions, average="macro", zero_division=0)
    )
    assert metrics.subset_accuracy(predictions, labels) == pytest.approx(
        sklearn_metrics.accuracy_score(labels, predictions)  # exact match of every label set
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_of_class_ids_matches_sklearn(seed):
    predictions, labels = _classes(seed, k=4)
    assert metrics.macro_f1(predictions, labels) == pytest.approx(
        sklearn_metrics.f1_score(labels, predictions, average="macro")
    )
    assert metrics.micro_f1(predictions, labels) == pytest.approx(
        sklearn_metrics.accuracy_score(labels, predictions)
    )
