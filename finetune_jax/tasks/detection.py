"""Object detection kind: boxes and classes of the objects in an image, on an anchor-free
(CenterNet / TTFNet-style) head over the ViT's last patch grid; COCO mAP with pycocotools;
predict writes COCO-format detections per image and, with --pictures, the boxes drawn.

Registered tasks: `cutpaste_detection` (../shared/data/cutpaste_fashion_elpv: Fashion-MNIST
items pasted on solar-cell images, COCO annotations), `coco_detection` (your COCO folders:
`data.dir/<split>/annotations.json`) and `detection_hub` (an HF dataset with an objects
column).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from finetune_jax.data import coco_loader, coco_sources
from finetune_jax.evaluation import detection_prediction, detection_scores, prediction
from finetune_jax.tasks import detection_losses
from finetune_jax.tasks.image_inputs import ImageInputKind


@dataclasses.dataclass(frozen=True)
class DetectionTask:
    """An object-detection task.

    Attributes:
      name: registry key.
      format: "coco" (annotation folders) or "hub" (an HF dataset); see `data/coco_sources.py`.
      label_names: class names, index = class id; None = the train split's categories.
      category_ids: class id -> the source's category id (COCO ids), known once loaded.
      hub_name, image_column, objects_column, box_format: the "hub" format's source.
      max_boxes: targets per image (`data.max_boxes`).
      max_detections, nms_iou: decoding (`data.max_detections`, `data.nms_iou`).
      subdir: conventional location under the shared data root.
    """

    name: str
    format: str
    label_names: tuple[str, ...] | None = None
    category_ids: tuple[int, ...] | None = None
    hub_name: str = ""
    image_column: str = "image"
    objects_column: str = "objects"
    box_format: str = "xywh"
    max_boxes: int = 100
    max_detections: int = 100
    nms_iou: float = 0.6
    subdir: str = ""
    kind = "detection"
    metrics = ()  # the eval step's metrics: none; COCO mAP comes from the scorer
    main_metric = "map"
    is_regression = False
    is_multi_label = False
    quote_none = False  # predict reads .tsv rows as ordinary quoted TSV

    def __post_init__(self):
        if self.format not in coco_sources.DETECTION_FORMATS:
            raise ValueError(
                f"task {self.name}: format {self.format!r} not in {coco_sources.DETECTION_FORMATS}"
            )
        coco_sources.box_format_check(self.box_format)

    @property
    def num_labels(self) -> int:
        if self.label_names is None:
            raise ValueError(
                f"task {self.name}: class names are not resolved yet (build the run's loader, "
                "which reads them from the train split's categories)"
            )
        return len(self.label_names)


DETECTION_TASKS: dict[str, DetectionTask] = {
    "cutpaste_detection": DetectionTask(
        name="cutpaste_detection", format="coco", subdir="cutpaste_fashion_elpv"
    ),
    "coco_detection": DetectionTask(name="coco_detection", format="coco"),
    "detection_hub": DetectionTask(name="detection_hub", format="hub"),
}


class Detection(ImageInputKind):
    """Images with boxes (see `data/coco_loader.py`); COCO box mAP."""

    name = "detection"
    tasks = DETECTION_TASKS
    data_keys = ImageInputKind.data_keys | frozenset(
        {
            "max_boxes",
            "max_detections",
            "nms_iou",
            "objects_column",
            "box_format",
            "draw_score",
        }
    )

    def configured(self, data) -> DetectionTask:
        task = self.tasks[data.task]
        changes: dict[str, Any] = {
            "image_column": data.image_column,
            "objects_column": data.objects_column,
            "box_format": data.box_format,
            "max_detections": data.max_detections,
            "nms_iou": data.nms_iou,
            "hub_name": data.hub_name,
            "max_boxes": data.max_boxes,
        }
        if data.label_names:
            changes["label_names"] = tuple(str(n) for n in data.label_names)
        return dataclasses.replace(task, **changes)

    def resolve(self, config, task, saved_names=None):
        return coco_loader.resolve_names(config, task, saved_names)

    def loader(self, config, task, preprocessor, model_ref, saved_names=None):
        return coco_loader.DetectionData(config, task, preprocessor, saved_names)

    def batch_spec(self, config, task):
        return coco_loader.DetectionData.batch_spec(config, task)

    def loss(self, task):
        return detection_losses.loss_for(task.max_detections, task.nms_iou)

    def metric_names(self, task) -> tuple[str, ...]:
        return (*super().metric_names(task), *detection_scores.METRICS)

    def evaluator(self, config, module, data, tokenizer):
        return None if data is None else detection_scores.CocoScorer(data.task.num_labels)

    def predictor(self, setup, params, source, threshold, files=None):
        return detection_prediction.DetectionPredictor(setup, params, source, files)

    def export_config(self, task) -> dict[str, Any]:
        names = task.label_names
        ids = task.category_ids or tuple(range(1, len(names) + 1))
        return {
            **prediction.class_names_config(names),
            "category_ids": list(ids),  # class id -> the source's COCO category id
        }


KIND = Detection()
