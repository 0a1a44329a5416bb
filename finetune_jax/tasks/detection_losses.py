"""The detector's loss (CenterNet's heatmap focal loss + TTFNet's Gaussian-weighted GIoU box
loss), its targets built on device from the padded boxes, and the decoded detections.

Targets (per image, from `labels` [B, M, 6] of `data/coco_batches.py`; crowd regions and
padding make none): each object spreads an elliptical Gaussian over the output cells, sigma
(w, h) / 6 (its half sides are 3 sigma: about CenterNet's radius for objects a few cells
wide, where TTFNet's 0.54 x that covers a single cell), centred on the box centre; the class's
heatmap target is the maximum over its objects, and exactly 1 at the cell nearest each
centre (the positive). Every cell inside a box (and its centre cell) regresses the box of
the object whose Gaussian is largest there, weighted by that Gaussian normalised to sum 1
per object, so small and large objects weigh alike.

Per image: (focal sum + BOX_WEIGHT * weighted GIoU loss sum) / max(objects, 1); the step sums
images by their weights and divides by the real images, so the loss is per object averaged
over images.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from finetune_jax.data.coco_batches import CLASS, FLAG, OBJECT
from finetune_jax.evaluation import detection_decoding

ALPHA = 1.0  # Gaussian sigma = ALPHA * side / 6: the half-side is 3 sigma
BOX_WEIGHT = 5.0  # GIoU loss weight against the heatmap's (TTFNet)


def focal_loss(logits: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
    """CenterNet's penalty-reduced focal loss summed over all but the leading axis:
    -(1 - p)^2 log p at positives, -(1 - y)^4 p^2 log(1 - p) elsewhere (y the Gaussian)."""
    logits = logits.astype(jnp.float32)
    p = jax.nn.sigmoid(logits)
    pos = jnp.square(1 - p) * jax.nn.log_sigmoid(logits)
    neg = jnp.square(p) * jnp.power(1 - target, 4) * jax.nn.log_sigmoid(-logits)
    per_cell = -jnp.where(positive, pos, neg)
    return jnp.sum(per_cell.reshape(per_cell.shape[0], -1), axis=-1)


def giou(a: jax.Array, b: jax.Array) -> jax.Array:
    """Generalised IoU of matching xyxy boxes [..., 4] -> [...] (in [-1, 1])."""
    area = lambda x: jnp.prod(jnp.clip(x[..., 2:] - x[..., :2], 0.0), axis=-1)
    inter = jnp.prod(
        jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0.0),
        axis=-1,
    )
    union = area(a) + area(b) - inter
    hull = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), -1)
    eps = 1e-7
    return inter / (union + eps) - (hull - union) / (hull + eps)


def gaussian_targets(
    boxes_BM4: jax.Array, real_BM: jax.Array, centers_P2: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(Gaussians [B, M, P], centre cells [B, M, P] one-hot, cells inside each box [B, M, P])
    of every object over the P output cells; zero for padding rows."""
    xy0, xy1 = boxes_BM4[..., :2], boxes_BM4[..., 2:]
    centre, size = (xy0 + xy1) / 2, jnp.maximum(xy1 - xy0, 1e-3)
    sigma = ALPHA * size / 6
    delta = centers_P2[None, None] - centre[:, :, None]  # [B, M, P, 2]
    gauss = jnp.exp(-jnp.sum(jnp.square(delta) / (2 * jnp.square(sigma[:, :, None])), -1))
    nearest = jnp.argmin(jnp.sum(jnp.square(delta), -1), axis=-1)  # [B, M]
    real = real_BM[..., None].astype(jnp.float32)
    centre_cells = jax.nn.one_hot(nearest, centers_P2.shape[0]) * real
    inside = jnp.all(
        (centers_P2[None, None] > xy0[:, :, None]) & (centers_P2[None, None] < xy1[:, :, None]), -1
    )
    return jnp.maximum(gauss * real, centre_cells), centre_cells, inside & (real > 0)


def class_maps(values_BMP: jax.Array, classes_BM: jax.Array, num_classes: int) -> jax.Array:
    """[B, P, C]: per class, the maximum over that class's objects of `values_BMP`."""
    batch = jnp.broadcast_to(jnp.arange(values_BMP.shape[0])[:, None], classes_BM.shape)
    maps = jnp.zeros((values_BMP.shape[0], num_classes, values_BMP.shape[2]), values_BMP.dtype)
    return jnp.moveaxis(maps.at[batch, classes_BM].max(values_BMP), 1, 2)


def box_targets(
    gauss_BMP: jax.Array, centre_BMP: jax.Array, inside_BMP: jax.Array, boxes_BM4: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """(the box each cell regresses [B, P, 4], its weight [B, P]): the object whose
    Gaussian is largest at the cell among those containing it (or centred on it)."""
    claim = jnp.where(inside_BMP | (centre_BMP > 0), gauss_BMP, 0.0)
    winner = jnp.argmax(claim, axis=1)  # [B, P]
    owned = claim * (jnp.arange(claim.shape[1])[None, :, None] == winner[:, None, :])
    per_object = jnp.sum(owned, axis=-1, keepdims=True)  # [B, M, 1]
    weight = jnp.sum(owned / jnp.maximum(per_object, 1e-9), axis=1)  # each object sums to 1
    target = jnp.take_along_axis(boxes_BM4, winner[..., None], axis=1)
    return target, weight


def detection_loss(
    outputs: dict[str, jax.Array],
    labels: jax.Array,
    weights: jax.Array,
    *,
    max_detections: int,
    nms_iou: float,
) -> tuple[jax.Array, jax.Array]:
    """(sum over images of weight x per-object loss, decoded detections [B, K, 6])."""
    heat_BHWC, boxes_BHW4, centers_HW2 = outputs["heatmap"], outputs["boxes"], outputs["centers"]
    batch, rows, cols, classes = heat_BHWC.shape
    centers_P2 = centers_HW2.reshape(rows * cols, 2)
    real_BM = labels[..., FLAG] == OBJECT
    classes_BM = labels[..., CLASS].astype(jnp.int32)
    gauss, centre, inside = gaussian_targets(labels[..., :4], real_BM, centers_P2)
    heat_target = class_maps(gauss, classes_BM, classes)
    positive = class_maps(centre, classes_BM, classes) > 0
    logits_BPC = heat_BHWC.reshape(batch, rows * cols, classes)
    focal_B = focal_loss(logits_BPC, heat_target, positive)
    target_BP4, weight_BP = box_targets(gauss, centre, inside, labels[..., :4])
    predicted_BP4 = boxes_BHW4.reshape(batch, rows * cols, 4)
    giou_B = jnp.sum(weight_BP * (1 - giou(predicted_BP4, target_BP4)), axis=-1)
    objects_B = jnp.maximum(jnp.sum(real_BM, axis=-1), 1).astype(jnp.float32)
    per_image = (focal_B + BOX_WEIGHT * giou_B) / objects_B
    # The input's extent: the cells tile it (centres at (i + 0.5) * stride).
    extent = (2 * centers_HW2[0, 0, 0] * cols, 2 * centers_HW2[0, 0, 1] * rows)
    detections = detection_decoding.decode(heat_BHWC, boxes_BHW4, extent, max_detections, nms_iou)
    return jnp.sum(per_image * weights), detections


def loss_for(max_detections: int, nms_iou: float):
    """The steps' (outputs, labels, weights) loss with the task's decoding settings bound."""
    return functools.partial(detection_loss, max_detections=max_detections, nms_iou=nms_iou)
