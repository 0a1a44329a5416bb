"""Per-host training batches of a cached tokenized split, through Grain.

The pipeline is Grain's: a `MapDataset` over global batch numbers (`range(steps_per_epoch)`
repeated forever), mapped with their index to this process's slice of that batch, turned into
a checkpointable `IterDataset`, and prefetched by `ThreadPrefetchIterDataset` (a background
thread prepares the next `prefetch` batches while the step runs). Its state is Grain's
`{"next_index": k}`; restoring it stops the prefetch thread and restarts at batch k.

Batch k is epoch `k // steps_per_epoch`, slice `k % steps_per_epoch` of
`text_batches.epoch_permutation(n, seed, epoch)` — the same global batches, padded to the
same buckets, as `text_batches.TrainBatches`, so the order depends on (seed, epoch) only,
never on the process count. Each process collates only its `local_rows` of the global batch,
so it reads only those rows' tokens from the memory-mapped cache (the bucket is chosen from
the rows' lengths, which every process has from the offsets). Grain's `ShardByJaxProcess`
says which slice is ours. Grain's own record sharding (`dataset[index::count]`) is not used:
it would give each process other records rather than a slice of one global batch.

The state also carries the fingerprint of the data (content digest per file): restoring on
different data raises `DataChangedError` naming the file, instead of silently continuing a
position computed for other rows.
"""

from __future__ import annotations

import weakref
from typing import Any

import grain
import numpy as np

from finetune_jax.data import text_batches
from finetune_jax.data.token_cache import NerSplit


class DataChangedError(ValueError):
    """A checkpoint's data position was saved for other data than the run now reads."""


class _GlobalBatchSlice:
    """Global batch number -> this process's collated slice of it (Grain map_with_index)."""

    def __init__(self, split: NerSplit, batch_size, seed, buckets, pad_id, shard):
        self._split, self._batch_size, self._seed = split, batch_size, seed
        self._buckets, self._pad_id, self._shard = buckets, pad_id, shard
        self._lengths = split.lengths
        self.steps_per_epoch = len(split) // batch_size
        self._epoch, self._permutation = -1, np.empty(0, np.int64)

    def __call__(self, index: int, _element: Any) -> dict[str, np.ndarray]:
        epoch, batch = divmod(int(index), self.steps_per_epoch)
        if epoch != self._epoch:  # one permutation per epoch, computed on first use
            self._permutation = text_batches.epoch_permutation(len(self._split), self._seed, epoch)
            self._epoch = epoch
        start = batch * self._batch_size
        global_rows = self._permutation[start : start + self._batch_size]
        length = text_batches.bucket_for(self._lengths[global_rows], self._buckets)
        rows = text_batches.local_rows(global_rows, *self._shard)
        return text_batches.collate(self._split, rows, length, self._pad_id)


class GrainTrainBatches:
    """Infinite, resumable, prefetched iterator over this process's training batch slices.

    `state()` / `restore()` save and resume the position exactly (with the data fingerprint);
    `prefetch` batches are prepared ahead in a background thread (0 = synchronously).
    """

    def __init__(
        self,
        split: NerSplit,
        batch_size: int,
        seed: int,
        buckets: tuple[int, ...],
        pad_id: int,
        prefetch: int = 2,
        shard: grain.sharding.ShardOptions | None = None,
    ):
        shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
        process = (shard.shard_index, shard.shard_count)
        text_batches.check_process_split(batch_size, *process)
        if len(split) < batch_size:
            raise ValueError(f"{len(split)} examples are fewer than one batch of {batch_size}")
        buckets = tuple(sorted(buckets))
        text_batches.bucket_for(split.lengths, buckets)  # fail now, not after hours of training
        mapper = _GlobalBatchSlice(split, batch_size, seed, buckets, pad_id, process)
        self.steps_per_epoch = mapper.steps_per_epoch
        self.fingerprint = dict(split.fingerprint)
        dataset = grain.MapDataset.range(self.steps_per_epoch).repeat().map_with_index(mapper)
        # No thread pool of its own: batches are made in order by the one prefetch thread.
        iterable = dataset.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
        if prefetch > 0:
            iterable = grain.experimental.ThreadPrefetchIterDataset(
                iterable, prefetch_buffer_size=prefetch
            )
        self._iterators = [iter(iterable)]
        # Stop the prefetch thread when this is dropped, or at exit while Grain's modules
        # still exist (its own __del__ fails during interpreter teardown).
        self.close = weakref.finalize(self, _close, self._iterators)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iterators[0])

    def state(self) -> dict[str, Any]:
        """The position of the next batch (Grain's state, plus epoch and batch for people
        reading the checkpoint) and the data's fingerprint; JSON-serialisable."""
        grain_state = dict(self._iterators[0].get_state())
        epoch, batch = divmod(int(grain_state["next_index"]), self.steps_per_epoch)
        return {
            "epoch": epoch,
            "batch_in_epoch": batch,
            "grain": grain_state,
            "files": self.fingerprint,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Moves to a position saved by `state()`, after checking it was saved for this data.

        A state without "grain" (saved by `TrainBatches`) resumes from its epoch and batch.
        """
        if "files" in state:
            _check_same_data(state["files"], self.fingerprint)
        epoch, batch = int(state["epoch"]), int(state["batch_in_epoch"])
        if epoch < 0 or not 0 <= batch < self.steps_per_epoch:
            raise ValueError(
                f"invalid iterator state {state} (steps_per_epoch={self.steps_per_epoch})"
            )
        grain_state = state.get("grain", {"next_index": epoch * self.steps_per_epoch + batch})
        if divmod(int(grain_state["next_index"]), self.steps_per_epoch) != (epoch, batch):
            raise DataChangedError(
                f"the checkpoint's data position (epoch {epoch}, batch {batch}, batch number "
                f"{grain_state['next_index']}) does not fit {self.steps_per_epoch} batches per "
                "epoch: the training rows changed (data.max_train_rows, data.holdout_rows or "
                "train.batch_size). Restore them, or train in a fresh workdir"
            )
        self._iterators[0].set_state(grain_state)


def _close(iterators: list) -> None:
    while iterators:
        iterators.pop().close()


def _check_same_data(saved: dict[str, str], current: dict[str, str]) -> None:
    """Raise DataChangedError naming the first file whose content differs from `saved`."""
    if list(saved.values()) == list(current.values()):
        return  # same content (perhaps moved): the saved position is valid
    for (old_path, old), (new_path, new) in zip(saved.items(), current.items()):
        if old != new:
            raise DataChangedError(
                f"training data file {new_path!r} changed since this workdir's checkpoint was "
                f"saved (content digest {new[:12]}, was {old[:12]} for {old_path!r}): the saved "
                "data position would continue on other rows. Restore that file, or train in a "
                "fresh workdir (a new --workdir) to start over on the new data"
            )
    raise DataChangedError(
        f"the training data files changed since this workdir's checkpoint was saved: now "
        f"{list(current)}, then {list(saved)}. Restore them, or train in a fresh workdir"
    )
