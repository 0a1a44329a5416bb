"""Predict for detection runs: each input image's detections as COCO result dicts, in the
image's own pixels, and (with --pictures) the image with its boxes and labels drawn.

The images go through the run's own eval batching and jitted eval step (whole image resized
to the model's square, decoded and NMS'd on device), so predictions are what eval scores.
Each output row gets `detections`: a list of {"image_id", "file_name", "category_id",
"category", "bbox": [x, y, w, h], "score"}, best first; `image_id` is the row's own
`image_id` column when it has one, else its 1-based number in the input, so
`jq -s '[.[].detections[]]' out.jsonl` is a COCO results file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image, ImageDraw

from finetune_jax.data import prediction_io
from finetune_jax.data.coco_sources import NO_OBJECTS, DetectionSplit
from finetune_jax.evaluation.detection_decoding import CLASS, SCORE, pairwise_iou

# Box colours by class id (Tableau 10), cycled.
PALETTE = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
)  # fmt: skip


def draw_detections(
    image: Image.Image, detections: Sequence[dict[str, Any]], label_names: Sequence[str]
) -> Image.Image:
    """A copy of `image` (RGB) with each detection's box and "<class> <score>" drawn."""
    picture = image.convert("RGB")
    pen = ImageDraw.Draw(picture)
    width = max(1, round(min(picture.size) / 150))
    for d in detections:
        x, y, w, h = d["bbox"]
        colour = PALETTE[label_names.index(d["category"]) % len(PALETTE)]
        pen.rectangle((x, y, x + w, y + h), outline=colour, width=width)
        text = f"{d['category']} {d['score']:.2f}"
        left, top, right, bottom = pen.textbbox((x, y), text)
        # Above the box; inside its top edge when that would leave the picture.
        lift = bottom - top + 2 if y >= bottom - top + 2 else -width
        pen.rectangle((left, top - lift, right + 2, bottom - lift), fill=colour)
        pen.text((x + 1, y - lift), text, fill=(255, 255, 255))
    return picture


def best_per_place(detections: Sequence[dict[str, Any]], iou: float = 0.7) -> list[dict]:
    """The detections (best first) less those overlapping a better one by `iou` whatever
    its class: a picture shows one label per object, where the output keeps every class's
    peak (COCO's mAP credits a right second guess)."""
    if not detections:
        return []
    xywh = np.asarray([d["bbox"] for d in detections], np.float32)
    boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
    overlap = np.asarray(pairwise_iou(boxes, boxes)) >= iou
    kept: list[int] = []
    for j in range(len(detections)):
        if not overlap[j, kept].any():
            kept.append(j)
    return [detections[j] for j in kept]


class DetectionPredictor:
    """rows (image paths) -> [{"detections": [...], "picture": path?}] per row."""

    def __init__(self, setup, params, source: str, files: prediction_io.FileOutputs | None):
        self.setup, self.params, self.source, self.files = setup, params, source, files
        self.size = setup.data.image_size
        self._rows_seen = 0
        self._picture_names: set[str] = set()

    def _split(self, rows: Sequence[dict[str, Any]]) -> DetectionSplit:
        images = prediction_io.image_split(rows, self.setup.config.data.image_column, self.source)
        first = self._rows_seen + 1
        ids = [row.get("image_id", first + i) for i, row in enumerate(rows)]
        task = self.setup.task
        category_ids = task.category_ids or tuple(range(1, task.num_labels + 1))
        return DetectionSplit(
            images,
            [NO_OBJECTS] * len(rows),
            np.asarray(ids, object),
            category_ids,
            task.label_names,
        )

    def _detections(self, split: DetectionSplit) -> list[np.ndarray]:
        found = []
        for batch in self.setup.data.eval_batches(split):
            out = jax.device_get(self.setup.eval_step(self.params, self.setup.put_batch(batch)))
            keep = np.asarray(out["weights"]) > 0  # the global batch's real rows
            found += list(np.asarray(out["predictions"])[keep])
        return found

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        split = self._split(rows)
        column = self.setup.config.data.image_column
        key = prediction_io.PATH_COLUMN if prediction_io.PATH_COLUMN in rows[0] else column
        outputs = []
        for i, found in enumerate(self._detections(split)):
            image, file_name = split.image(i), os.path.basename(str(rows[i][key]))
            detections = self.coco_results(found, split, i, image.size, file_name)
            row: dict[str, Any] = {"detections": detections}
            if self.files is not None and self.files.pictures:
                row["picture"] = self._draw(image, detections, file_name, i)
            outputs.append(row)
        self._rows_seen += len(rows)
        return outputs

    def coco_results(
        self, found: np.ndarray, split: DetectionSplit, i: int, size, file_name: str
    ) -> list[dict]:
        """Row i's detections with a score above 0 as COCO result dicts, in the image's
        pixels (the model saw it stretched to its square input)."""
        scale = np.asarray([size[0], size[1], size[0], size[1]], np.float64) / self.size
        names = split.label_names
        results = []
        for d in found[found[:, SCORE] > 0]:
            x0, y0, x1, y1 = (d[:4] * scale).tolist()
            c = int(d[CLASS])
            results.append(
                {
                    "image_id": split.image_ids[i],
                    "file_name": file_name,
                    "category_id": int(split.category_ids[c]),
                    "category": names[c],
                    "bbox": [round(v, 2) for v in (x0, y0, x1 - x0, y1 - y0)],
                    "score": round(float(d[SCORE]), 4),
                }
            )
        return results

    def _draw(self, image: Image.Image, detections: list[dict], file_name: str, i: int) -> str:
        shown = best_per_place(
            [d for d in detections if d["score"] >= self.setup.config.data.draw_score]
        )
        stem = os.path.splitext(file_name)[0]
        name = f"{stem}.png"
        if name in self._picture_names:  # two inputs of one name from different folders
            name = f"{stem}_{self._rows_seen + i + 1}.png"
        self._picture_names.add(name)
        path = self.files.path(name)
        draw_detections(image, shown, self.setup.task.label_names).save(path)
        return path
