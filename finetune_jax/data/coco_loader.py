"""`DetectionData`: an object-detection task's splits and batches, as the train loop sees them.

Splits come from `coco_sources` (objects in memory, images decoded per batch), rows are picked
by `selection` as for every kind (holdout carved from train by `data.split_seed`, caps),
every image file is opened once when its split loads (`image_checks`, `data.bad_images`),
and batches come from `coco_batches` through the shared prefetching, resumable image
iterators (`image_batches`). Class names are the train split's categories (or the run's
saved names, which must agree); an eval split declaring other categories is an error.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import ml_collections
import numpy as np

from finetune_jax.data import (
    coco_batches,
    coco_sources,
    image_checks,
    image_loader,
    image_preprocess,
    selection,
)
from finetune_jax.data.label_names import choose_label_names
from finetune_jax.data.text_sources import DataError


def resolve_names(
    config: ml_collections.ConfigDict, task: Any, saved_names: tuple[str, ...] | None
) -> Any:
    """`task` with class names, without reading data when the config or the run names them
    (an abstract build); else the train split's categories."""
    given = tuple(str(n) for n in config.data.label_names) or None
    if given is not None or saved_names is not None:
        names = choose_label_names(given, saved_names, lambda: ())
    else:
        names = coco_sources.category_names(task, config.data)
    return dataclasses.replace(task, label_names=tuple(names))


class DetectionData(image_loader.BatchedImages):
    """Images decoded, placed and normalised per batch; augmentation on training batches."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        task: Any,
        processor,
        saved_names: tuple[str, ...] | None = None,
    ):
        self.config, self.processor = config, processor
        self.augment = image_loader.augmentation(config)
        self.image_size = image_preprocess.output_size(processor)
        self._files: dict[str, coco_sources.DetectionSplit] = {}  # file split -> loaded
        self._unreadable: dict[str, np.ndarray] = {}  # split -> rows left out, once checked
        train = self._files["train"] = coco_sources.load_split(task, config.data, "train")
        given = tuple(str(n) for n in config.data.label_names) or None
        if task.format == "coco" and given is not None and given != train.label_names:
            raise ValueError(
                f"data.label_names={given} but {train.images.source} declares the categories "
                f"{train.label_names}; leave data.label_names empty"
            )
        names = choose_label_names(train.label_names, saved_names, lambda: ())
        self.task = dataclasses.replace(task, label_names=names, category_ids=train.category_ids)
        self.collate = functools.partial(coco_batches.collate, max_boxes=task.max_boxes)

    @staticmethod
    def batch_spec(config: ml_collections.ConfigDict, task: Any) -> dict[str, tuple]:
        """[B, S, S, 3] pixels (S = `data.image_size`), [B, max_boxes, 6] box targets."""
        size = config.data.image_size
        if size <= 0:
            raise ValueError("a detection task's batch shape needs data.image_size > 0")
        rows = config.train.batch_size
        return {
            "pixel_values": ((rows, size, size, 3), np.dtype(np.float32)),
            "labels": ((rows, task.max_boxes, coco_batches.FIELDS), np.dtype(np.float32)),
            "weights": ((rows,), np.dtype(np.float32)),
        }

    def _file(self, name: str) -> coco_sources.DetectionSplit:
        """A whole file split, read once; other splits with the train's classes."""
        if name not in self._files:
            self._files[name] = coco_sources.load_split(self.task, self.config.data, name)
        return self._files[name]

    def load(self, split: str) -> coco_sources.DetectionSplit:
        """`split` ("train", "validation", "test" or "holdout") with its objects; every image
        file opened once, and every image's box count checked against `data.max_boxes`."""
        loaded = self._file(selection.file_split(split))
        if loaded.label_names != self.task.label_names:
            raise DataError(
                f"{loaded.images.source} declares the categories {loaded.label_names}, the "
                f"train split {self.task.label_names}: a split must use the train's classes"
            )
        rows = selection.config_rows(self.config, split, len(loaded))
        chosen = loaded if rows is None else coco_sources.take(loaded, rows)
        if split not in self._unreadable:
            policy = self.config.data.bad_images
            self._unreadable[split] = image_checks.rows_to_leave_out(chosen.images, split, policy)
        bad = self._unreadable[split]
        if len(bad):
            chosen = coco_sources.take(chosen, np.setdiff1d(np.arange(len(chosen)), bad))
        coco_batches.check_box_counts(chosen, self.task.max_boxes)
        return chosen
