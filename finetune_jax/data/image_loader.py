"""`ImageData`: an image-classification task's splits and batches, as the train loop sees them.

Splits come from `image_sources` (labels in memory, images decoded per batch), rows are picked
by `selection` exactly as for text (holdout carved from train by `data.split_seed`, caps),
and batches from `image_batches` through the model's image processor. Class names the task
does not fix come from `data.label_names` or from the train split, before the model is built, so
the head's width is known. `BatchedImages` is the batching every image kind's loader shares.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from finetune_jax.data import (
    image_batches,
    image_checks,
    image_preprocess,
    image_sources,
    selection,
)
from finetune_jax.data.label_names import choose_label_names


def resolve_task(
    config: ml_collections.ConfigDict,
    task: image_sources.ImageTask,
    saved_names: tuple[str, ...] | None = None,
) -> image_sources.ImageTask:
    """`task` with its class names: its own, `data.label_names`, the run's saved names, or
    discovered from train (see `tasks.choose_label_names`)."""
    labels = tuple(str(name) for name in config.data.label_names)
    if task.label_names is not None:
        if labels and labels != task.label_names:
            raise ValueError(
                f"data.label_names={labels} but task {task.name!r} fixes its classes "
                f"{task.label_names}; leave data.label_names empty"
            )
        return task
    names = choose_label_names(
        labels or None,
        saved_names,
        lambda: image_sources.discover_label_names(task, config.data),
    )
    if len(names) < 2:
        raise ValueError(f"task {task.name!r} needs at least 2 classes, found {list(names)}")
    return dataclasses.replace(task, label_names=names)


def augmentation(config: ml_collections.ConfigDict) -> image_preprocess.Augment | None:
    """The train-time augmentation `config.data` asks for (None = off)."""
    data = config.data
    if not data.augment:
        return None
    return image_preprocess.Augment(scale=tuple(data.augment_scale), flip=data.augment_flip)


class BatchedImages:
    """The loop's batches of the splits `self.load(name)` returns, for any image kind: a
    subclass sets `config`, `processor`, `augment` and `collate` (its batch maker, with
    `image_batches.collate`'s signature)."""

    config: ml_collections.ConfigDict
    processor: Any
    augment: image_preprocess.Augment | None
    collate: Callable[..., dict[str, np.ndarray]]
    # Training batches' maker when it differs from eval's (segmentation's crops); None = collate.
    train_collate: Callable[..., dict[str, np.ndarray]] | None = None

    def train_batches(self) -> image_batches.ImageTrainBatches:
        """The resumable, seeded (augmented) training iterator for this process."""
        return image_batches.ImageTrainBatches(
            self.load("train"),
            self.processor,
            batch_size=self.config.train.batch_size,
            seed=self.config.seed,
            augment=self.augment,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            collate=self.train_collate or self.collate,
        )

    def eval_batches(self, split) -> Iterator[dict[str, np.ndarray]]:
        """Fixed-order, un-augmented eval batches (last one padded with weight-0 rows)."""
        return image_batches.eval_batches(
            split,
            self.processor,
            self.config.train.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            collate=self.collate,
        )

    def eval_batch_count(self, split) -> int:
        """How many batches `eval_batches(split)` yields (for progress)."""
        return -(-len(split) // self.config.train.batch_size)


class ImageData(BatchedImages):
    """Images decoded and preprocessed per batch; augmentation on training batches only."""

    collate = staticmethod(image_batches.collate)

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        task: image_sources.ImageTask,
        processor,
        saved_names: tuple[str, ...] | None = None,
    ):
        self.config, self.processor = config, processor
        self.task = resolve_task(config, task, saved_names)
        self.augment = augmentation(config)
        self.image_size = image_preprocess.output_size(processor)
        self._unreadable: dict[str, np.ndarray] = {}  # split -> rows left out, once checked

    @staticmethod
    def batch_spec(
        config: ml_collections.ConfigDict, task: image_sources.ImageTask
    ) -> dict[str, tuple]:
        """[B, S, S, 3] float32 pixels with S = `data.image_size`; an int class per row."""
        size = config.data.image_size
        if size <= 0:
            raise ValueError("an image task's batch shape needs data.image_size > 0")
        rows = config.train.batch_size
        return {
            "pixel_values": ((rows, size, size, 3), np.dtype(np.float32)),
            "labels": ((rows,), np.dtype(np.int32)),
            "weights": ((rows,), np.dtype(np.float32)),
        }

    def load(self, split: str) -> image_sources.ImageSplit:
        """`split` ("train", "validation", "test" or "holdout"), images not yet decoded, but
        every file opened once (`image_checks`, under `data.bad_images`), so a bad one stops
        the run (or is left out) before step 1."""
        loaded = image_sources.load_split(
            self.task, self.config.data, selection.file_split(split), self.task.label_names
        )
        strata = loaded.labels if loaded.strata is None else loaded.strata
        rows = selection.config_rows(self.config, split, len(loaded), strata)
        chosen = loaded if rows is None else image_sources.take(loaded, rows)
        if split not in self._unreadable:  # once per split (label_prior, then train_batches)
            policy = self.config.data.bad_images
            self._unreadable[split] = image_checks.rows_to_leave_out(chosen, split, policy)
        return image_checks.without(chosen, self._unreadable[split])

    def label_prior(self) -> np.ndarray:
        """Log class frequencies of the train split (add-one smoothed), as head biases."""
        labels = self.load("train").labels
        counts = np.bincount(labels, minlength=self.task.num_labels) + 1.0
        return np.log(counts / counts.sum()).astype(np.float32)
