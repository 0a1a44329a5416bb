"""`SegmentationData`: a segmentation task's splits and batches, as the train loop sees them.

Batches are dicts of numpy arrays:
  pixel_values  float32 [B, S, S, 3] (channels last, normalised by the model's processor)
  labels        int32 [B, S, S]: class ids, `data.ignore_index` where nothing counts
                (padding rows are all ignore)
  weights       float32 [B]; 1 for real rows, 0 for padding rows
S = `data.image_size` in eval and predict: the whole image resized to S x S (no centre crop:
every pixel is scored, the masks at S x S); training batches are `data.crop_size` (0 = S)
squares placed by `dense_augment`'s random resized crop + flip (`data.augment*`, seeded by
(seed, epoch, example), so resumes are exact). The mask moves with the pixels (nearest
neighbour).
Splits, row selection, file checks and the resumable order are the image kind's.
"""

from __future__ import annotations

import dataclasses
import functools

import ml_collections
import numpy as np

from finetune_jax.data import (
    dense_augment,
    image_batches,
    image_checks,
    image_loader,
    image_preprocess,
    selection,
)
from finetune_jax.data.label_names import choose_label_names
from finetune_jax.data.segmentation_sources import (
    SegmentationSplit,
    SegmentationTask,
    discover_class_names,
    load_split,
    subset,
)

PADDING_ROW = image_batches.PADDING_ROW


def head_settings(model: ml_collections.ConfigDict) -> tuple[tuple[str, object], ...]:
    """The segmentation head's `model.*` settings, as the task (and an export's
    config.json) records them."""
    settings = [
        ("type", model.segmentation_head),
        ("layers", model.segmentation_layers),
        ("cls_token", model.segmentation_cls_token),
    ]
    if model.segmentation_head == "decoder":
        settings.append(("decoder_channels", model.decoder_channels))
    return tuple(settings)


def resolve_task(
    config: ml_collections.ConfigDict,
    task: SegmentationTask,
    saved_names: tuple[str, ...] | None = None,
) -> SegmentationTask:
    """`task` with its class names (`data.label_names`, the run's saved names, or the train
    split's annotations.json) and the run's head settings."""
    given = tuple(str(name) for name in config.data.label_names) or task.label_names
    names = choose_label_names(given, saved_names, lambda: discover_class_names(task, config.data))
    if len(names) < 2:
        raise ValueError(
            f"task {task.name!r} needs at least 2 classes (background and one), found {names}"
        )
    return dataclasses.replace(task, label_names=names, head=head_settings(config.model))


def collate(
    split: SegmentationSplit,
    indices: np.ndarray,
    processor,
    augment: image_preprocess.Augment | None = None,
    seed: int = 0,
    epoch: int = 0,
    *,
    size: int,
    classes: int,
    ignore_index: int,
) -> dict[str, np.ndarray]:
    """Decodes, places (at `size` x `size`) and normalises the examples at `indices` (-1: a
    padding row)."""
    indices = np.asarray(indices, np.int64)
    pixels = np.zeros((len(indices), size, size, 3), np.float32)
    labels = np.full((len(indices), size, size), ignore_index, np.int32)
    weights = np.zeros(len(indices), np.float32)
    real = np.flatnonzero(indices != PADDING_ROW)
    placed = []
    for row in real:
        index = int(indices[row])
        image = split.image(index)
        if augment is None:
            placement = dense_augment.whole_image(image.width, image.height, size)
        else:
            rng = image_preprocess.example_rng(seed, epoch, index)
            placement = dense_augment.sample_placement(
                image.width, image.height, size, augment, rng
            )
        placed.append(dense_augment.warp_image(image, placement))
        if split.masks is not None:
            mask = split.mask(index, image.size, classes, ignore_index)
            labels[row] = dense_augment.warp_mask(mask, placement, ignore_index)
    if placed:
        pixels[real] = image_preprocess.normalised(processor, placed)
        weights[real] = 1.0
    return {"pixel_values": pixels, "labels": labels, "weights": weights}


class SegmentationData(image_loader.BatchedImages):
    """Images and masks decoded per batch; augmentation on training batches only."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        task: SegmentationTask,
        processor,
        saved_names: tuple[str, ...] | None = None,
    ):
        self.config, self.processor = config, processor
        self.task = resolve_task(config, task, saved_names)
        self.augment = image_loader.augmentation(config)
        labels = {"classes": self.task.num_labels, "ignore_index": self.task.ignore_index}
        size = config.data.image_size
        self.collate = functools.partial(collate, size=size, **labels)
        self.train_collate = functools.partial(
            collate, size=config.data.crop_size or size, **labels
        )
        self._unreadable: dict[str, np.ndarray] = {}  # split -> rows left out, once checked

    @staticmethod
    def batch_spec(config: ml_collections.ConfigDict, task: SegmentationTask) -> dict[str, tuple]:
        """A training batch: [B, S, S, 3] float32 pixels, [B, S, S] int32 class ids, S =
        `data.crop_size` (or `data.image_size`); eval batches, at `data.image_size`, hold no
        gradients."""
        size, rows = config.data.crop_size or config.data.image_size, config.train.batch_size
        if size <= 0:
            raise ValueError("a segmentation task's batch shape needs data.image_size > 0")
        return {
            "pixel_values": ((rows, size, size, 3), np.dtype(np.float32)),
            "labels": ((rows, size, size), np.dtype(np.int32)),
            "weights": ((rows,), np.dtype(np.float32)),
        }

    def load(self, split: str) -> SegmentationSplit:
        """`split` ("train", "validation", "test" or "holdout"), nothing decoded, but every
        image and mask file opened once (`image_checks`, under `data.bad_images`)."""
        loaded = load_split(self.task, self.config.data, selection.file_split(split))
        rows = selection.config_rows(self.config, split, len(loaded))
        chosen = loaded if rows is None else subset(loaded, rows)
        if split not in self._unreadable:
            policy = self.config.data.bad_images
            bad = image_checks.rows_to_leave_out(chosen.images, split, policy)
            if chosen.masks is not None:
                masks = image_checks.rows_to_leave_out(chosen.masks, f"{split} mask", policy)
                bad = np.union1d(bad, masks).astype(np.int64)
            self._unreadable[split] = bad
        bad = self._unreadable[split]
        return chosen if not len(bad) else subset(chosen, np.setdiff1d(np.arange(len(chosen)), bad))
