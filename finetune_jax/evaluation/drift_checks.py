"""Monitoring a deployed model: what it sees and predicts on a stream of rows (a `Sample`),
and the drift checks between a reference sample and new data, each with its threshold.

Checks (statistics in `drift_statistics.py`): input length PSI (reference-decile bins) and the change of
the unknown-token rate (text); predicted-label PSI and KL (regression: predicted-score PSI
over reference deciles); confidence (top class probability) PSI over 10 equal bins; the MMD
two-sample test of the pooled features; the accuracy drop when both sides have labels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from finetune_jax.evaluation import drift_statistics
from finetune_jax.evaluation.prediction import model_outputs, probabilities


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """When a statistic counts as drift (the `monitor` flags' defaults)."""

    psi: float = 0.2  # PSI above this: a significant shift (the usual 0.1 / 0.2 rule)
    kl: float = 0.1  # KL(new || reference) of predicted labels above this, in nats
    mmd_p: float = 0.01  # MMD permutation p-value below this: the embeddings differ
    unknown_rate: float = 0.01  # unknown-token rate up by more than this (absolute)
    accuracy_drop: float = 0.05  # accuracy down by more than this (absolute)


@dataclasses.dataclass
class Sample:
    """Per-row outputs over a whole stream; features kept for at most `max_rows` rows
    (a uniform reservoir sample, fixed seed), everything else for every row."""

    name: str
    probs: np.ndarray  # [N, C] class probabilities (regression: [N, 1] scores)
    features: np.ndarray  # [<= max_rows, F]
    lengths: np.ndarray | None  # [N] tokens per row (text tasks)
    unknown: np.ndarray | None  # [N] unknown tokens per row (text tasks)
    labels: np.ndarray | None  # [N] class id, -1 where a row has no (known) label

    @property
    def rows(self) -> int:
        return len(self.probs)


def label_id(value: Any, names: Sequence[str], raw_to_id: dict[str, int]) -> int:
    """A label cell as a class id: a class name, a raw label as the task's files write it,
    or an id; -1 when empty or unknown."""
    text = "" if value is None else str(value).strip()
    if text in names:
        return list(names).index(text)
    if text in raw_to_id:
        return raw_to_id[text]
    return int(text) if text.isdigit() and int(text) < len(names) else -1


def collect(
    setup, params, chunks: Iterable[list[dict]], name: str, label_names, max_rows=1000, seed=0
) -> Sample:
    """Runs the model over `chunks` of rows (a head task) and keeps what monitoring needs."""
    task, rng = setup.task, np.random.default_rng(seed)
    regression = task.is_regression
    raw_to_id = {} if regression else dict(task.label_to_id)
    probs, lengths, unknown, labels, kept = [], [], [], [], []
    seen = 0
    for rows in chunks:
        out = model_outputs(setup, params, rows, name)
        probs.append(out.logits if regression else probabilities(task, out.logits))
        if out.lengths is not None:
            lengths.append(out.lengths)
            unknown.append(out.unknown)
        if not regression:
            cells = [row.get(task.label_column) for row in rows]
            labels.append([label_id(c, label_names, raw_to_id) for c in cells])
        for feature in out.features:  # reservoir sampling (Algorithm R)
            slot = seen if seen < max_rows else int(rng.integers(0, seen + 1))
            if slot == len(kept):
                kept.append(feature)
            elif slot < max_rows:
                kept[slot] = feature
            seen += 1
    if not probs:
        raise ValueError(f"{name}: no rows to monitor")
    labels_all = np.concatenate(labels) if labels else None
    if labels_all is not None and not (labels_all >= 0).any():
        labels_all = None
    return Sample(
        name,
        np.concatenate(probs),
        np.stack(kept),
        np.concatenate(lengths) if lengths else None,
        np.concatenate(unknown) if unknown else None,
        labels_all,
    )


@dataclasses.dataclass(frozen=True)
class Check:
    """One statistic, its threshold and whether it flags drift ("above" / "below" it)."""

    statistic: str
    value: float | None
    threshold: float | None
    direction: str  # "above": drift when value > threshold; "below": when value < it
    reference: float | None = None  # the reference side's value, where one exists
    new: float | None = None

    @property
    def flagged(self) -> bool:
        if self.value is None or self.threshold is None:
            return False
        if self.direction == "above":
            return self.value > self.threshold
        return self.value < self.threshold


def compare(
    reference: Sample,
    new: Sample,
    thresholds: Thresholds,
    permutations: int = 500,
    max_rows: int = 1000,
    seed: int = 0,
) -> tuple[list[Check], drift_statistics.MMDResult]:
    """Every check of the module docstring, in report order, and the MMD test's details."""
    checks = []
    if reference.lengths is not None and new.lengths is not None:
        edges = drift_statistics.quantile_edges(reference.lengths)
        checks.append(
            Check(
                "input length PSI",
                drift_statistics.psi(
                    drift_statistics.binned(reference.lengths, edges),
                    drift_statistics.binned(new.lengths, edges),
                ),
                thresholds.psi,
                "above",
                float(reference.lengths.mean()),
                float(new.lengths.mean()),
            )
        )
        ref_rate = reference.unknown.sum() / max(reference.lengths.sum(), 1)
        new_rate = new.unknown.sum() / max(new.lengths.sum(), 1)
        checks.append(
            Check(
                "unknown-token rate increase",
                float(new_rate - ref_rate),
                thresholds.unknown_rate,
                "above",
                float(ref_rate),
                float(new_rate),
            )
        )
    checks += _prediction_checks(reference, new, thresholds)
    mmd = drift_statistics.mmd_test(reference.features, new.features, permutations, max_rows, seed)
    checks.append(Check("embedding MMD p-value", mmd.p_value, thresholds.mmd_p, "below"))
    checks += _accuracy_checks(reference, new, thresholds)
    return checks, mmd


def _prediction_checks(reference: Sample, new: Sample, thresholds: Thresholds) -> list[Check]:
    if reference.probs.shape[1] == 1:  # regression: predicted scores over reference deciles
        edges = drift_statistics.quantile_edges(reference.probs[:, 0])
        ref, cur = (drift_statistics.binned(s.probs[:, 0], edges) for s in (reference, new))
        return [
            Check("predicted score PSI", drift_statistics.psi(ref, cur), thresholds.psi, "above")
        ]
    classes = reference.probs.shape[1]
    ref, cur = (np.bincount(s.probs.argmax(1), minlength=classes) for s in (reference, new))
    edges = np.linspace(1.0 / classes, 1.0, 11)[1:-1]  # 10 equal bins of the top probability
    ref_conf, new_conf = reference.probs.max(1), new.probs.max(1)
    return [
        Check("predicted label PSI", drift_statistics.psi(ref, cur), thresholds.psi, "above"),
        Check("predicted label KL", drift_statistics.kl(ref, cur), thresholds.kl, "above"),
        Check(
            "confidence PSI",
            drift_statistics.psi(
                drift_statistics.binned(ref_conf, edges), drift_statistics.binned(new_conf, edges)
            ),
            thresholds.psi,
            "above",
            float(ref_conf.mean()),
            float(new_conf.mean()),
        ),
    ]


def accuracy(sample: Sample) -> float | None:
    """Accuracy over the rows with a known label, None when there are none."""
    if sample.labels is None or sample.probs.shape[1] == 1:
        return None
    known = sample.labels >= 0
    return float(np.mean(sample.probs[known].argmax(1) == sample.labels[known]))


def _accuracy_checks(reference: Sample, new: Sample, thresholds: Thresholds) -> list[Check]:
    ref, cur = accuracy(reference), accuracy(new)
    if cur is None:
        return []
    if ref is None:  # nothing to compare with: reported, never flagged
        return [Check("accuracy", cur, None, "below", None, cur)]
    return [Check("accuracy drop", ref - cur, thresholds.accuracy_drop, "above", ref, cur)]
