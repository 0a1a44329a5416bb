"""Semantic-segmentation scores from a confusion matrix accumulated over a whole split.

The eval step's "predictions" of a segmentation task are per-image confusion matrices
[B, C, C] (true class x predicted class, `tasks/losses.py`'s `pixel_classification_loss`);
`SegmentationScorer` sums those of the real rows over every batch, so IoU is the split's
(intersection and union summed over all its pixels), never a mean of per-batch values.

Scores (class 0 is the background, as mask PNGs have it):
  mean_iou        mean IoU over the classes present (in the labels or the predictions:
                  mmsegmentation's convention; a class never seen nor predicted is left out)
  background_iou  IoU of class 0
  pixel_accuracy  correct pixels / counted pixels
  iou_<name>      per class 1..C-1; NaN (null in files) for a class absent from both
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

SUMMARY = ("mean_iou", "background_iou", "pixel_accuracy")


def metric_names(label_names: Sequence[str] | None) -> tuple[str, ...]:
    """Every score name; per-class ones only once the class names are known."""
    return (*SUMMARY, *(f"iou_{name}" for name in (label_names or ())[1:]))


def scores(confusion: np.ndarray, label_names: Sequence[str]) -> dict[str, float]:
    """The scores of a [C, C] confusion matrix (rows: true class, columns: predicted)."""
    confusion = np.asarray(confusion, np.float64)
    if confusion.shape != (len(label_names),) * 2:
        raise ValueError(f"confusion {confusion.shape} for {len(label_names)} classes")
    hit = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - hit
    present = union > 0
    iou = np.full(len(hit), np.nan)
    iou[present] = hit[present] / union[present]
    total = confusion.sum()
    result = {
        # 0.0, not NaN, for a split with no counted pixel: keep-best still compares.
        "mean_iou": float(iou[present].mean()) if present.any() else 0.0,
        "background_iou": float(iou[0]),
        "pixel_accuracy": float(hit.sum() / total) if total else 0.0,
    }
    result.update({f"iou_{name}": float(v) for name, v in zip(label_names[1:], iou[1:])})
    return result


class SegmentationScorer:
    """Sums the eval step's per-image confusion matrices; scores them at the end."""

    def __init__(self, label_names: Sequence[str]):
        self.label_names = tuple(label_names)
        self.confusion = np.zeros((len(self.label_names),) * 2, np.float64)

    def add(self, params: Any, device_batch: Any, out: dict[str, Any], keep: np.ndarray) -> None:
        """Adds the real rows' confusion matrices of one eval batch."""
        self.confusion += np.asarray(out["predictions"], np.float64)[keep].sum(axis=0)

    def result(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        """(scores, no per-example records); starts over for the next eval."""
        confusion, self.confusion = self.confusion, np.zeros_like(self.confusion)
        return scores(confusion, self.label_names), []
