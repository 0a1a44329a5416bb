"""COCO box mAP of a whole split with pycocotools, accumulated batch by batch.

The eval step returns each global batch's decoded detections (`predictions` [B, K, 6]) and
its padded box targets (`labels` [B, M, 6], in the same input pixels); the scorer keeps the
real rows of both and, at the end, builds an in-memory COCO ground truth and result set
and runs `COCOeval` ("bbox"): AP averaged over IoU 0.50:0.95 (`map`), at 0.50 (`map_50`) and
at 0.75 (`map_75`), with COCO's 100 detections per image. Crowd regions are COCO's
"iscrowd" ignore regions. Boxes are in the resized input's pixels: an IoU does not change
when both boxes are scaled alike, so these equal the scores in the original images' pixels
(COCO's small / medium / large split would not, and is not reported).
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from finetune_jax.data.coco_batches import CLASS, CROWD, FLAG
from finetune_jax.evaluation.detection_decoding import CLASS as DETECTED_CLASS
from finetune_jax.evaluation.detection_decoding import SCORE

METRICS = ("map", "map_50", "map_75")


def coco_ground_truth(labels: list[np.ndarray], num_classes: int) -> dict[str, Any]:
    """A COCO dataset dict of the images' targets (image ids 1..N in order)."""
    annotations = []
    for image_id, boxes in enumerate(labels, 1):
        for box in boxes[boxes[:, FLAG] > 0]:
            w, h = float(box[2] - box[0]), float(box[3] - box[1])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(box[CLASS]) + 1,
                    "bbox": [float(box[0]), float(box[1]), w, h],
                    "area": w * h,
                    "iscrowd": int(box[FLAG] == CROWD),
                }
            )
    return {
        "images": [{"id": i} for i in range(1, len(labels) + 1)],
        "annotations": annotations,
        "categories": [{"id": c + 1} for c in range(num_classes)],
    }


def coco_detections(detections: list[np.ndarray]) -> list[dict[str, Any]]:
    """COCO result dicts of the images' detections with a score above 0."""
    results = []
    for image_id, found in enumerate(detections, 1):
        for d in found[found[:, SCORE] > 0]:
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(d[DETECTED_CLASS]) + 1,
                    "bbox": [float(d[0]), float(d[1]), float(d[2] - d[0]), float(d[3] - d[1])],
                    "score": float(d[SCORE]),
                }
            )
    return results


def coco_map(labels: list[np.ndarray], detections: list[np.ndarray], num_classes: int):
    """{"map", "map_50", "map_75"} of `detections` against `labels`, one array per image.

    No detection at all scores 0; no ground-truth object at all is an error (COCO's AP is
    undefined there)."""
    from pycocotools.coco import COCO  # noqa: PLC0415 (only an eval needs it)
    from pycocotools.cocoeval import COCOeval  # noqa: PLC0415

    truth = coco_ground_truth(labels, num_classes)
    if not any(not a["iscrowd"] for a in truth["annotations"]):
        raise ValueError("COCO mAP of a split with no object to find is undefined")
    results = coco_detections(detections)
    if not results:
        return dict.fromkeys(METRICS, 0.0)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints every stage
        gt = COCO()
        gt.dataset = truth
        gt.createIndex()
        evaluation = COCOeval(gt, gt.loadRes(results), "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    stats = evaluation.stats
    # -1 marks "nothing to score" in COCOeval; a class-free split is refused above.
    return {name: max(float(v), 0.0) for name, v in zip(METRICS, stats[:3])}


class CocoScorer:
    """The eval scorer (see `evaluation/evaluator.py`): `add` per batch, `result` at the end
    (which also starts the next eval afresh)."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
        self._labels: list[np.ndarray] = []
        self._detections: list[np.ndarray] = []

    def add(self, params, device_batch, out: dict[str, Any], keep: np.ndarray) -> None:
        """Keeps the real rows' targets and detections (host arrays of the eval step)."""
        self._labels += list(np.asarray(out["labels"])[keep])
        self._detections += list(np.asarray(out["predictions"])[keep])

    def result(self) -> tuple[dict[str, float], list[dict[str, Any]]]:
        labels, detections = self._labels, self._detections
        self._labels, self._detections = [], []
        return coco_map(labels, detections, self.num_classes), []
