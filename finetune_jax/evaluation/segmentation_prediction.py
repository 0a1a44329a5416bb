"""Predict for segmentation runs: a PNG of class ids per input image and, on request, a
picture of the mask over the image for a person to look at.

Each image is predicted as eval sees it (the whole image resized to `data.image_size`, the
run's jitted `predict_step`), the argmax class map is resized back to the image's own size
(nearest neighbour) and written to `<files dir>/<image stem>.png` (mode L: pixel value =
class id; 16-bit for more than 256 classes); with `--pictures`, `<stem>_overlay.png` blends a
colour per class (PASCAL VOC's palette; background left as it is) over the image. The output
row says where they are (`mask`, `picture`) and which classes it found (`classes`, pixel
fractions of each non-background class).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from PIL import Image

from finetune_jax.data import prediction_io
from finetune_jax.data.segmentation_sources import SegmentationSplit

OVERLAY_ALPHA = 0.5


def palette(classes: int) -> np.ndarray:
    """uint8 [classes, 3]: PASCAL VOC's colour map (class 0 black), distinct per class."""
    colours = np.zeros((classes, 3), np.uint8)
    for k in range(classes):
        value, shift = k, 7
        while value:
            for channel in range(3):
                colours[k, channel] |= ((value >> channel) & 1) << shift
            value, shift = value >> 3, shift - 1
    return colours


def overlay(image: Image.Image, class_map: np.ndarray) -> Image.Image:
    """`image` (RGB) with each non-background pixel blended with its class's colour."""
    pixels = np.asarray(image.convert("RGB"), np.float32)
    colours = palette(int(class_map.max()) + 1)[class_map].astype(np.float32)
    blend = np.where(
        (class_map > 0)[..., None], (1 - OVERLAY_ALPHA) * pixels + OVERLAY_ALPHA * colours, pixels
    )
    return Image.fromarray(blend.round().astype(np.uint8), mode="RGB")


def mask_image(class_map: np.ndarray, classes: int) -> Image.Image:
    """The class map as a PNG-ready image whose pixel values are the class ids."""
    if classes <= 256:
        return Image.fromarray(class_map.astype(np.uint8), mode="L")
    return Image.fromarray(class_map.astype(np.uint16), mode="I;16")


class MaskPredictor:
    """Writes each chunk's masks (and pictures) into `files`; returns their columns."""

    def __init__(self, setup, params, source: str, files: prediction_io.FileOutputs):
        self.setup, self.params, self.source, self.files = setup, params, source, files
        self._used: set[str] = set()  # file stems written, so two inputs never share one

    def class_maps(self, split: SegmentationSplit) -> list[np.ndarray]:
        """The argmax class map [S, S] of every image of `split`, in order."""
        setup, maps = self.setup, []
        for batch in setup.data.eval_batches(split):
            out = jax.device_get(setup.predict_step(self.params, setup.put_batch(batch)))
            keep = np.asarray(out["weights"]) > 0  # the global batch's real rows
            maps += list(np.argmax(np.asarray(out["logits"])[keep], axis=-1))
        return maps

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        column = self.setup.config.data.image_column
        images = prediction_io.image_split(rows, column, self.source)
        split = SegmentationSplit(images, None, self.source)
        names = self.setup.task.label_names
        outputs = []
        for i, class_map in enumerate(self.class_maps(split)):
            image = split.image(i)
            resized = mask_image(class_map, len(names)).resize(image.size, Image.Resampling.NEAREST)
            full = np.asarray(resized).astype(np.int64)
            stem = self._stem(str(rows[i].get(prediction_io.PATH_COLUMN, rows[i].get(column))))
            row: dict[str, Any] = {"mask": self.files.path(stem + ".png")}
            resized.save(row["mask"])
            if self.files.pictures:
                row["picture"] = self.files.path(stem + "_overlay.png")
                overlay(image, full).save(row["picture"])
            counts = np.bincount(full.ravel(), minlength=len(names)) / full.size
            found = np.flatnonzero(counts[1:]) + 1
            row["classes"] = {names[k]: round(float(counts[k]), 4) for k in found}
            outputs.append(row)
        return outputs

    def _stem(self, path: str) -> str:
        """A file stem for an input: its own name, numbered when an earlier one had it."""
        base = os.path.splitext(os.path.basename(path))[0] or "image"
        stem, n = base, 1
        while stem in self._used:
            stem, n = f"{base}_{n}", n + 1
        self._used.add(stem)
        return stem
