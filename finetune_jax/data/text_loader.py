"""`ClassificationData`: a text classification / multi-label / regression task's splits and
batches as the train loop sees them: tokenized once into the on-disk token cache, padded to
a few lengths (buckets), training batches through Grain."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import jax
import ml_collections
import numpy as np

from finetune_jax.data import grain_batches, selection, text_batches, text_sources, token_cache
from finetune_jax.data.label_names import choose_label_names
from finetune_jax.data.text_tasks import Task


def resolve_text_task(
    config: ml_collections.ConfigDict, task: Task, saved_names: tuple[str, ...] | None = None
) -> Task:
    """`task` with its class names (see `tasks.choose_label_names`; inferred from the train
    split when neither the config nor the run's saved names give them)."""
    if task.is_regression:
        return task
    names = choose_label_names(
        task.label_names,
        saved_names,
        lambda: text_sources.infer_label_names(task, config.data.dir or None),
    )
    return dataclasses.replace(task, label_names=names)


class ClassificationData:
    """Tokenized sentence(-pair) examples batched into a few padded lengths (buckets).

    Splits are tokenized once into the on-disk cache (`token_cache`) and memory-mapped;
    training batches come per process through Grain (`grain_batches`)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        task: Task,
        tokenizer,
        saved_names: tuple[str, ...] | None = None,
    ):
        self.config, self.tokenizer = config, tokenizer
        self.task = resolve_text_task(config, task, saved_names)
        self.buckets = text_batches.bucket_lengths(
            config.data.max_length, tuple(config.data.buckets)
        )

    @staticmethod
    def batch_spec(config: ml_collections.ConfigDict, task: Task) -> dict[str, tuple]:
        """Rows padded to the longest bucket; a float score or an int class per row."""
        rows = config.train.batch_size
        length = max(
            text_batches.bucket_lengths(config.data.max_length, tuple(config.data.buckets))
        )
        tokens = ((rows, length), np.dtype(np.int32))
        if task.is_multi_label:  # multi-hot rows
            labels = ((rows, task.num_labels), np.dtype(np.float32))
        else:
            labels = ((rows,), np.dtype(np.float32 if task.is_regression else np.int32))
        return {
            "input_ids": tokens,
            "attention_mask": tokens,
            "token_type_ids": tokens,
            "labels": labels,
            "weights": ((rows,), np.dtype(np.float32)),
        }

    def examples(self, split: str) -> text_sources.Examples:
        """The untokenized rows of `split` ("train", "validation", "test" or "holdout")."""
        examples = text_sources.load_split(
            self.task, self.config.data.dir or None, selection.file_split(split)
        )
        classes = None if self.task.is_regression else np.asarray(examples.labels)
        rows = selection.config_rows(self.config, split, len(examples), classes)
        return examples if rows is None else text_sources.take(examples, rows)

    def load(self, split: str) -> token_cache.NerSplit:
        """The tokenized rows of `split`, from the on-disk token cache (built on first use)."""
        data = self.config.data
        tokens = token_cache.open_split(
            self.task,
            data.dir or None,
            selection.file_split(split),
            self.tokenizer,
            data.max_length,
            data.cache_dir,
        )
        classes = None if self.task.is_regression else tokens.labels
        rows = selection.config_rows(self.config, split, len(tokens), classes)
        return tokens if rows is None else tokens.take(rows)

    def label_prior(self) -> np.ndarray:
        """The train labels' prior as head biases [num_labels]: the mean score for
        regression, log class frequencies (add-one smoothed) for classification, each
        class's log-odds for multi-label."""
        labels = self.load("train").labels
        if self.task.is_regression:
            return np.asarray([labels.mean()], np.float32)
        if self.task.is_multi_label:
            positive = (labels.sum(axis=0) + 1.0) / (len(labels) + 2.0)
            return np.log(positive / (1.0 - positive)).astype(np.float32)
        counts = np.bincount(labels, minlength=self.task.num_labels) + 1.0
        return np.log(counts / counts.sum()).astype(np.float32)

    def train_batches(self) -> grain_batches.GrainTrainBatches:
        """This process's slices of the seeded, bucketed global batches, prepared ahead in
        a background thread; resumable, and checked against the data on resume."""
        return grain_batches.GrainTrainBatches(
            self.load("train"),
            batch_size=self.config.train.batch_size,
            seed=self.config.seed,
            buckets=self.buckets,
            pad_id=self.tokenizer.pad_token_id,
            prefetch=self.config.data.prefetch,
        )

    def eval_batches(self, encoded: token_cache.NerSplit) -> Iterator[dict[str, np.ndarray]]:
        """Fixed-order eval batches (last one padded with weight-0 rows)."""
        return text_batches.eval_batches(
            encoded,
            self.config.train.batch_size,
            self.buckets,
            self.tokenizer.pad_token_id,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_batch_count(self, encoded: token_cache.NerSplit) -> int:
        """How many batches `eval_batches(encoded)` yields (for progress)."""
        return -(-len(encoded) // self.config.train.batch_size)
