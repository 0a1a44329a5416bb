"""Geometry shared by dense vision tasks: one placement (a window of the source image, resized
to the output square, maybe flipped) applied alike to an image, its mask and its boxes.

A `Placement` is drawn per example from a numpy Generator (`sample_placement`, torchvision's
RandomResizedCrop draw from `image_preprocess.crop_box`, then a coin for the flip), so the
randomness of `image_preprocess.example_rng(seed, epoch, index)` makes resumed runs see the
same crops; `whole_image` is the un-augmented placement (eval, predict).

Coordinates are continuous pixels: the source pixel (i, j) covers [j, j + 1) x [i, i + 1),
output pixel u's centre u + 0.5 comes from source x = left + (u + 0.5) * width / size (PIL's
own convention, so the bilinear image and the nearest-neighbour mask line up exactly).
Boxes are COCO xywh in pixels; a box is mapped, clipped to the output and dropped (with its
labels) when less than `min_side` pixels of it remain in either direction.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from finetune_jax.data.image_preprocess import Augment, crop_box


@dataclasses.dataclass(frozen=True)
class Placement:
    """The output square `size` x `size` shows `window` (left, top, right, bottom, in source
    pixels; it may reach outside the image) resized, then mirrored left-right if `flip`."""

    window: tuple[float, float, float, float]
    size: int
    flip: bool = False

    def __post_init__(self):
        left, top, right, bottom = self.window
        if not (right > left and bottom > top and self.size > 0):
            raise ValueError(f"placement window {self.window} at size {self.size} is empty")

    @property
    def scale(self) -> tuple[float, float]:
        """Output pixels per source pixel, (x, y)."""
        left, top, right, bottom = self.window
        return self.size / (right - left), self.size / (bottom - top)


def whole_image(width: int, height: int, size: int) -> Placement:
    """The whole image resized to `size` x `size`, not flipped (eval and predict)."""
    return Placement((0.0, 0.0, float(width), float(height)), size)


def sample_placement(
    width: int, height: int, size: int, augment: Augment, rng: np.random.Generator
) -> Placement:
    """A random resized crop of a `width` x `height` image (area fraction in
    `augment.scale`, aspect in `augment.ratio`), flipped half the time if `augment.flip`."""
    window = tuple(float(v) for v in crop_box(width, height, augment, rng))
    flip = bool(augment.flip and rng.random() < 0.5)
    return Placement(window, size, flip)


def warp_image(image: Image.Image, placement: Placement) -> Image.Image:
    """`image` placed (bilinear, antialiased when shrinking); outside the image is black."""
    left, top, right, bottom = placement.window
    # PIL's resize box must lie inside the image: pad first when the window leaves it.
    x0, y0 = math.floor(left), math.floor(top)
    x1, y1 = math.ceil(right), math.ceil(bottom)
    if x0 < 0 or y0 < 0 or x1 > image.width or y1 > image.height:
        image = image.crop((x0, y0, x1, y1))  # PIL fills what lies outside with zeros
        left, top, right, bottom = left - x0, top - y0, right - x0, bottom - y0
    size = (placement.size, placement.size)
    out = image.resize(size, Image.Resampling.BILINEAR, box=(left, top, right, bottom))
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if placement.flip else out


def _source_indices(start: float, scale: float, size: int, limit: int) -> np.ndarray:
    """Source pixel index under each output pixel's centre; -1 where it falls outside."""
    index = np.floor(start + (np.arange(size) + 0.5) / scale).astype(np.int64)
    return np.where((index >= 0) & (index < limit), index, -1)


def warp_mask(mask: np.ndarray, placement: Placement, ignore_value: int) -> np.ndarray:
    """A [H, W] integer mask placed (nearest neighbour), int32 [size, size]; output pixels
    whose source lies outside the image take `ignore_value`."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"a mask is [H, W] class ids; got shape {mask.shape}")
    left, top, _, _ = placement.window
    scale_x, scale_y = placement.scale
    cols = _source_indices(left, scale_x, placement.size, mask.shape[1])
    rows = _source_indices(top, scale_y, placement.size, mask.shape[0])
    out = mask[np.maximum(rows, 0)][:, np.maximum(cols, 0)].astype(np.int32)
    out[(rows < 0)[:, None] | (cols < 0)[None, :]] = ignore_value
    return out[:, ::-1].copy() if placement.flip else out


def warp_boxes(
    boxes_xywh: np.ndarray, labels: np.ndarray, placement: Placement, min_side: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Boxes [N, 4] (x, y, w, h in source pixels) placed and clipped to the output square,
    float32; boxes left narrower or shorter than `min_side` output pixels are dropped, and
    `labels` (any array with N rows: class ids, or several per-box fields) with them."""
    boxes = np.asarray(boxes_xywh, np.float64).reshape(-1, 4)
    labels = np.asarray(labels)
    if len(labels) != len(boxes):
        raise ValueError(f"{len(boxes)} boxes but {len(labels)} labels")
    left, top, _, _ = placement.window
    scale_x, scale_y = placement.scale
    x0 = (boxes[:, 0] - left) * scale_x
    x1 = (boxes[:, 0] + boxes[:, 2] - left) * scale_x
    y0 = (boxes[:, 1] - top) * scale_y
    y1 = (boxes[:, 1] + boxes[:, 3] - top) * scale_y
    if placement.flip:
        x0, x1 = placement.size - x1, placement.size - x0
    x0, x1, y0, y1 = (np.clip(v, 0, placement.size) for v in (x0, x1, y0, y1))
    keep = (x1 - x0 >= min_side) & (y1 - y0 >= min_side)
    out = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)[keep].astype(np.float32)
    return out, labels[keep]
