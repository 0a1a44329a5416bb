"""The detector head's outputs -> a fixed number of scored boxes per image, inside jit.

CenterNet's decoding: class probabilities (sigmoid of the heatmap), a cell kept where it is
the maximum of its 3x3 neighbourhood (the peak picking that stands in for most of NMS), the
`max_detections` best (cell, class) pairs over the whole map, each with the box its cell
regressed. Then a greedy per-class NMS over those few boxes (a loop of `max_detections`
vector steps, cheap on device), since two peaks a few cells apart can still be one object.

Detections are float32 [B, K, 6]: x0, y0, x1, y1 (input pixels), score, class id; a
suppressed detection keeps its place with score 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SCORE, CLASS = 4, 5  # columns of a detection


def pairwise_iou(a_N4: jax.Array, b_M4: jax.Array) -> jax.Array:
    """[N, M] IoU of xyxy boxes (0 where the union is empty)."""
    lo = jnp.maximum(a_N4[:, None, :2], b_M4[None, :, :2])
    hi = jnp.minimum(a_N4[:, None, 2:], b_M4[None, :, 2:])
    inter = jnp.prod(jnp.clip(hi - lo, 0.0), axis=-1)
    area = lambda b: jnp.prod(jnp.clip(b[..., 2:] - b[..., :2], 0.0), axis=-1)
    union = area(a_N4)[:, None] + area(b_M4)[None, :] - inter
    return jnp.where(union > 0, inter / jnp.maximum(union, 1e-9), 0.0)


def class_nms(boxes_K4: jax.Array, classes_K: jax.Array, scores_K: jax.Array, iou: float):
    """Scores [K] with greedy per-class NMS applied (suppressed -> 0); the boxes must come
    in descending score order, as `lax.top_k` gives them."""
    k = scores_K.shape[0]
    order = jnp.arange(k)
    overlap = (
        (pairwise_iou(boxes_K4, boxes_K4) > iou)
        & (classes_K[:, None] == classes_K[None, :])
        & (order[:, None] < order[None, :])  # only a better-scored box suppresses
    )
    keep = lax.fori_loop(0, k, lambda i, keep: keep & ~(keep[i] & overlap[i]), scores_K > 0)
    return jnp.where(keep, scores_K, 0.0)


def decode(
    heatmap_BHWC: jax.Array,
    boxes_BHW4: jax.Array,
    extent: tuple[jax.Array, jax.Array],
    max_detections: int,
    nms_iou: float,
) -> jax.Array:
    """Detections [B, K, 6] from heatmap logits and per-cell boxes; boxes are clipped to
    the input's `extent` (width, height in pixels). `nms_iou` >= 1 skips the NMS."""
    batch, rows, cols, classes = heatmap_BHWC.shape
    heat = jax.nn.sigmoid(heatmap_BHWC.astype(jnp.float32))
    pooled = lax.reduce_window(heat, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 1, 1, 1), "SAME")
    peaks = jnp.where(heat == pooled, heat, 0.0).reshape(batch, rows * cols * classes)
    k = min(max_detections, rows * cols * classes)
    scores, index = lax.top_k(peaks, k)
    cell, cls = index // classes, index % classes
    boxes = jnp.take_along_axis(boxes_BHW4.reshape(batch, rows * cols, 4), cell[..., None], 1)
    width, height = extent
    boxes = jnp.clip(boxes, 0.0, jnp.stack([width, height, width, height]))
    if nms_iou < 1:
        scores = jax.vmap(class_nms, in_axes=(0, 0, 0, None))(boxes, cls, scores, nms_iou)
    return jnp.concatenate([boxes, scores[..., None], cls[..., None].astype(jnp.float32)], -1)
