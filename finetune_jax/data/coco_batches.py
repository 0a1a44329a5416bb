"""Detection batches: each image placed at the model's square input (the whole image resized,
or for training a random resized crop + flip, `dense_augment`), normalised by the model's
image processor, and its boxes moved with the pixels and padded to a fixed count.

Batches are dicts of numpy arrays:
  pixel_values  float32 [B, S, S, 3] (channels last, normalised)
  labels        float32 [B, max_boxes, 6]: per box x0, y0, x1, y1 in pixels of the S x S input,
                its class id, and a flag: OBJECT (1), CROWD (2: a COCO crowd region, never
                trained on, scored as "ignore") or 0 for padding
  weights       float32 [B]; 1 for real rows, 0 for padding rows
The whole image is stretched to S x S (no centre crop: that would cut objects off); boxes
are scaled with it, so an IoU, and the mAP, is the same in either image's pixels.
"""

from __future__ import annotations

import numpy as np

from finetune_jax.data import dense_augment, image_preprocess, text_batches
from finetune_jax.data.coco_sources import DetectionSplit, Objects
from finetune_jax.data.text_sources import DataError

FIELDS = 6  # x0, y0, x1, y1, class, flag
CLASS, FLAG = 4, 5
OBJECT, CROWD = 1.0, 2.0
# Boxes a training crop leaves thinner than this many output pixels are dropped; eval keeps
# every box with any area left (its score must count every object).
TRAIN_MIN_SIDE = 1.0
EVAL_MIN_SIDE = 1e-3


def box_targets(
    boxes_xywh: np.ndarray, classes: np.ndarray, crowd: np.ndarray, max_boxes: int, where: str
) -> np.ndarray:
    """float32 [max_boxes, FIELDS] for one image's placed boxes (xywh, output pixels)."""
    if len(boxes_xywh) > max_boxes:
        raise DataError(too_many(where, len(boxes_xywh), max_boxes))
    out = np.zeros((max_boxes, FIELDS), np.float32)
    n = len(boxes_xywh)
    out[:n, :2] = boxes_xywh[:, :2]
    out[:n, 2:4] = boxes_xywh[:, :2] + boxes_xywh[:, 2:]
    out[:n, CLASS] = classes
    out[:n, FLAG] = np.where(crowd, CROWD, OBJECT)
    return out


def too_many(where: str, count: int, max_boxes: int) -> str:
    return (
        f"{where}: {count} boxes, more than data.max_boxes={max_boxes} (targets are padded "
        f"to a fixed count): set data.max_boxes to at least {count}"
    )


def check_box_counts(split: DetectionSplit, max_boxes: int) -> None:
    """Refuses a split with an image of more than `max_boxes` objects, before step 1."""
    counts = np.asarray([len(o) for o in split.objects])
    if len(counts) and counts.max() > max_boxes:
        row = int(np.argmax(counts))
        raise DataError(too_many(split.locate(row), int(counts[row]), max_boxes))


def place(
    image,
    objects: Objects,
    size: int,
    augment: image_preprocess.Augment | None,
    rng: np.random.Generator | None,
):
    """(the image at `size` x `size`, boxes xywh in its pixels, their [class, crowd] rows)."""
    if augment is None:
        placement = dense_augment.whole_image(image.width, image.height, size)
    else:
        placement = dense_augment.sample_placement(image.width, image.height, size, augment, rng)
    fields = np.stack([objects.classes, objects.crowd.astype(np.int32)], axis=1)
    min_side = EVAL_MIN_SIDE if augment is None else TRAIN_MIN_SIDE
    boxes, fields = dense_augment.warp_boxes(objects.boxes, fields, placement, min_side)
    return dense_augment.warp_image(image, placement), boxes, fields


def collate(
    split: DetectionSplit,
    indices: np.ndarray,
    processor,
    augment: image_preprocess.Augment | None = None,
    seed: int = 0,
    epoch: int = 0,
    *,
    max_boxes: int,
) -> dict[str, np.ndarray]:
    """The batch of the images at `indices` (index -1 makes a padding row); augmentation
    randomness from (seed, epoch, image index), so a resumed run sees the same crops."""
    indices = np.asarray(indices, np.int64)
    real = np.flatnonzero(indices != text_batches.PADDING_ROW)
    size = image_preprocess.output_size(processor)
    pixels = np.zeros((len(indices), size, size, 3), np.float32)
    labels = np.zeros((len(indices), max_boxes, FIELDS), np.float32)
    weights = np.zeros(len(indices), np.float32)
    images = []
    for r in real:
        i = int(indices[r])
        rng = None if augment is None else image_preprocess.example_rng(seed, epoch, i)
        image, boxes, fields = place(split.image(i), split.objects[i], size, augment, rng)
        images.append(image)
        labels[r] = box_targets(boxes, fields[:, 0], fields[:, 1] > 0, max_boxes, split.locate(i))
        weights[r] = 1.0
    if images:
        pixels[real] = image_preprocess.normalised(processor, images)
    return {"pixel_values": pixels, "labels": labels, "weights": weights}
