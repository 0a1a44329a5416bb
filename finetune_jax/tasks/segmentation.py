"""Semantic segmentation kind: a class per pixel, from a linear or light-decoder head on a
ViT's patch tokens (`models/segmentation_heads.py`); pixel-wise cross-entropy with an ignore
value; mean IoU, background IoU, per-class IoU and pixel accuracy from a confusion matrix over
the whole split; predict writes a PNG of class ids per image (and a picture on request)."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from finetune_jax.data import segmentation_loader
from finetune_jax.data.segmentation_sources import SegmentationTask
from finetune_jax.evaluation import prediction, segmentation_metrics, segmentation_prediction
from finetune_jax.models.segmentation_heads import HEAD, HEADS
from finetune_jax.tasks import losses
from finetune_jax.tasks.image_inputs import ImageInputKind

SEGMENTATION_TASKS: dict[str, SegmentationTask] = {
    # data.dir/<split>/images/ + data.dir/<split>/<data.mask_dir>/ (e.g. cutpaste_fashion_elpv)
    "segmentation_folder": SegmentationTask(name="segmentation_folder", format="folder"),
    # an HF dataset with image and mask columns (data.hub_name, or data.dir from save_to_disk)
    "segmentation_hub": SegmentationTask(name="segmentation_hub", format="hub"),
}


class Segmentation(ImageInputKind):
    """Images and class-id masks (`data/segmentation_loader.py`); IoU from a confusion matrix."""

    name = "segmentation"
    tasks = SEGMENTATION_TASKS
    predicts_with_head = True
    data_keys = ImageInputKind.data_keys | {"mask_dir", "mask_column", "ignore_index", "crop_size"}

    def configured(self, data):
        return dataclasses.replace(
            self.tasks[data.task],
            mask_dir=data.mask_dir,
            mask_column=data.mask_column,
            ignore_index=data.ignore_index,
        )

    def resolve(self, config, task, saved_names=None):
        return segmentation_loader.resolve_task(config, task, saved_names)

    def check_options(self, config, task) -> None:
        super().check_options(config, task)
        model = config.model
        if model.segmentation_head not in HEADS:
            raise ValueError(
                f"model.segmentation_head={model.segmentation_head!r}: expected one of {HEADS}"
            )
        if model.segmentation_head == "decoder" and model.decoder_channels % 4:
            raise ValueError(
                f"model.decoder_channels={model.decoder_channels}: the decoder halves it twice; "
                "use a multiple of 4"
            )
        if config.data.image_size <= 0:
            raise ValueError(
                "data.image_size=0: a segmentation run needs its input size (e.g. 224, a "
                "multiple of the patch size); masks are scored at that size"
            )

    def model_overrides(self, config, task) -> dict[str, Any]:
        model = config.model
        return super().model_overrides(config, task) | {
            "segmentation_head": model.segmentation_head,
            "segmentation_layers": model.segmentation_layers,
            "segmentation_cls_token": model.segmentation_cls_token,
            "decoder_channels": model.decoder_channels,
        }

    def loader(self, config, task, preprocessor, model_ref, saved_names=None):
        return segmentation_loader.SegmentationData(config, task, preprocessor, saved_names)

    def batch_spec(self, config, task):
        return segmentation_loader.SegmentationData.batch_spec(config, task)

    def loss(self, task):
        return functools.partial(losses.pixel_classification_loss, ignore_index=task.ignore_index)

    def metric_names(self, task) -> tuple[str, ...]:
        return ("loss", *segmentation_metrics.metric_names(task.label_names))

    def evaluator(self, config, module, data, tokenizer):
        return (
            None if data is None else segmentation_metrics.SegmentationScorer(data.task.label_names)
        )

    def predictor(self, setup, params, source, threshold, files=None):
        if files is None:
            raise ValueError("segmentation predict writes a mask file per image: pass `files`")
        return segmentation_prediction.MaskPredictor(setup, params, source, files)

    def export_config(self, task) -> dict[str, Any]:
        names = task.label_names
        return {
            **prediction.class_names_config(names),
            # How to rebuild the head from segmentation_head.safetensors (README).
            HEAD: {**dict(task.head), "ignore_index": task.ignore_index},
        }


KIND = Segmentation()
