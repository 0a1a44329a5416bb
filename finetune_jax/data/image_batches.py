"""Batches of images for the step: seeded, resumable training order with augmentation decoded
one batch ahead in a background thread, and fixed-order eval batches.

Batches are dicts of numpy arrays:
  pixel_values  float32 [B, S, S, 3] (channels last, normalised)
  labels        int32 [B]
  weights       float32 [B]; 1 for real rows, 0 for padding rows (all-zero pixels)
The order is text_batches' `EpochOrder` (depends on (seed, epoch) only), each process decodes
only its own rows, and `state()` is the position of the next batch the caller gets (not of
the one being decoded ahead), so checkpoints resume exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from finetune_jax.data import image_preprocess, text_batches
from finetune_jax.data.image_sources import ImageSplit

PADDING_ROW = text_batches.PADDING_ROW


def collate(
    split: ImageSplit,
    indices: np.ndarray,
    processor,
    augment: image_preprocess.Augment | None = None,
    seed: int = 0,
    epoch: int = 0,
) -> dict[str, np.ndarray]:
    """Decodes and preprocesses the examples at `indices`; index -1 makes a padding row."""
    indices = np.asarray(indices, np.int64)
    real = np.flatnonzero(indices != PADDING_ROW)
    size = image_preprocess.output_size(processor)
    pixels = np.zeros((len(indices), size, size, 3), np.float32)
    labels = np.zeros(len(indices), np.int32)
    weights = np.zeros(len(indices), np.float32)
    if real.size:
        images = [split.image(int(indices[r])) for r in real]
        rngs = [image_preprocess.example_rng(seed, epoch, int(indices[r])) for r in real]
        pixels[real] = image_preprocess.pixel_values(processor, images, augment, rngs)
        labels[real] = split.labels[indices[real]]
        weights[real] = 1.0
    return {"pixel_values": pixels, "labels": labels, "weights": weights}


class ImageTrainBatches(text_batches.OrderedBatches):
    """Infinite, resumable iterator over shuffled (augmented) training batches.

    While the step runs on batch k, a worker thread decodes batch k + 1 (PIL and the
    processor's numpy work release the GIL for most of it), so decoding stays off the
    step's critical path; `prefetch=False` decodes in the caller instead.
    """

    def __init__(
        self,
        split: ImageSplit,
        processor,
        batch_size: int,
        seed: int,
        augment: image_preprocess.Augment | None,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: bool = True,
        collate: Callable[..., dict[str, np.ndarray]] = collate,
    ):
        text_batches.check_process_split(batch_size, process_index, process_count)
        self.order = text_batches.EpochOrder(len(split), batch_size, seed)
        self._split, self._processor, self._seed, self._augment = split, processor, seed, augment
        self._collate = collate  # another kind's (split, indices, processor, augment, seed, epoch)
        self._process = (process_index, process_count)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="images") if prefetch else None
        # (position of the batch, its future), for the batch decoded ahead.
        self._ahead: tuple[dict[str, int], Future] | None = None

    def _start_next(self) -> tuple[dict[str, int], Future]:
        position = self.order.state()
        rows = text_batches.local_rows(self.order.next_rows(), *self._process)
        args = (self._split, rows, self._processor, self._augment, self._seed, position["epoch"])
        if self._pool is None:
            future: Future = Future()
            future.set_result(self._collate(*args))
        else:
            future = self._pool.submit(self._collate, *args)
        return position, future

    def __next__(self) -> dict[str, np.ndarray]:
        _, future = self._ahead or self._start_next()
        self._ahead = self._start_next()
        return future.result()

    def state(self) -> dict[str, int]:
        """The position of the next batch `__next__` returns, as plain ints."""
        return dict(self._ahead[0]) if self._ahead else self.order.state()

    def restore(self, state: dict[str, int]) -> None:
        """Moves to a position saved by `state()`; a batch decoded ahead is dropped."""
        self._ahead = None
        self.order.restore(state)


def eval_batches(
    split: ImageSplit,
    processor,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    collate: Callable[..., dict[str, np.ndarray]] = collate,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example once, in order, un-augmented; the last global batch filled with
    weight-0 padding rows so every process yields the same number of equal batches.
    `collate`: another kind's batch maker (as `ImageTrainBatches` takes it)."""
    text_batches.check_process_split(batch_size, process_index, process_count)
    for start in range(0, len(split), batch_size):
        rows = np.full(batch_size, PADDING_ROW, np.int64)
        stop = min(start + batch_size, len(split))
        rows[: stop - start] = np.arange(start, stop)
        local = text_batches.local_rows(rows, process_index, process_count)
        yield collate(split, local, processor)
