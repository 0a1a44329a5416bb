"""A task's data as the train loop sees it: load a split, training batches, eval batches.

Three kinds, picked by the task: `ClassificationData` (sentence(-pair) classification and
regression: tokenize, length buckets), `ChatData` (causal-LM SFT on chat records:
assistant-only loss, packed rows), `ImageData` (image classification: images decoded per
batch through the model's image processor, `image_loader.py`) and `speech_data.SpeechData`
(seq2seq speech recognition: cached log-mel features, teacher-forced transcripts). All
yield the batch contract of `steps.py`: model
inputs plus `labels` and `weights` (weight 0 = padding), so one train step serves both.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from finetune_jax.data import (
    chat_batches,
    grain_batches,
    selection,
    text_batches,
    text_sources,
    token_cache,
)
from finetune_jax.data.image_loader import ImageData
from finetune_jax.data.speech_data import SpeechData
from finetune_jax.data.tasks import ChatTask, ImageTask, SpeechTask, Task, choose_label_names

AnyTask = Task | ChatTask | ImageTask | SpeechTask


def _loader_class(task: AnyTask) -> type:
    kinds = {"causal_lm": ChatData, "image_classification": ImageData, "seq2seq": SpeechData}
    return kinds.get(task.kind, ClassificationData)


def make_loader(
    config: ml_collections.ConfigDict,
    task: AnyTask,
    preprocessor,
    model_dir="",
    saved_names: tuple[str, ...] | None = None,
):
    """The loader for `task`'s kind; `preprocessor` is its tokenizer or image processor. A
    speech task also reads the model directory's feature extractor and generation config;
    a text classifier takes the class names a run saved (`saved_names`)."""
    if task.kind == "seq2seq":
        return SpeechData(config, task, preprocessor, model_dir)
    if task.kind in ("classification", "image_classification"):
        return _loader_class(task)(config, task, preprocessor, saved_names)
    return _loader_class(task)(config, task, preprocessor)


def batch_spec(
    config: ml_collections.ConfigDict, task: AnyTask
) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{name: (shape, dtype)} of the largest global batch `task`'s loader yields; no data or
    tokenizer is read (preflight compiles the step on it)."""
    return _loader_class(task).batch_spec(config, task)


def _rows(
    config: ml_collections.ConfigDict, split: str, num_rows: int, strata=None
) -> np.ndarray | None:
    return selection.config_rows(config, split, num_rows, strata)


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
        rows = _rows(self.config, split, len(examples), classes)
        return examples if rows is None else text_sources.take(examples, rows)

    def load(self, split: str) -> token_cache.TokenSplit:
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
        rows = _rows(self.config, split, len(tokens), classes)
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

    def eval_batches(self, encoded: token_cache.TokenSplit) -> Iterator[dict[str, np.ndarray]]:
        """Fixed-order eval batches (last one padded with weight-0 rows)."""
        return text_batches.eval_batches(
            encoded,
            self.config.train.batch_size,
            self.buckets,
            self.tokenizer.pad_token_id,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )


@dataclasses.dataclass
class ChatSplit:
    """One split of chat records: the conversations (for generation) and their packed rows."""

    conversations: list[chat_batches.Conversation]
    rows: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.conversations)


def step_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """SFT row fields -> the step's batch: next-token `labels`, per-token `weights`."""
    batch = {k: rows[k] for k in ("input_ids", "attention_mask", "segment_ids", "positions")}
    return {**batch, "labels": rows["targets"], "weights": rows["loss_mask"]}


class _StepBatches(chat_batches.SFTBatches):
    """SFTBatches yielding step batches (position, resume and epochs unchanged)."""

    def __next__(self) -> dict[str, np.ndarray]:
        return step_batch(super().__next__())


class ChatData:
    """Chat records rendered with the tokenizer's chat template, loss on assistant tokens,
    several examples packed per row of `data.max_length` tokens (`data.packing`)."""

    def __init__(self, config: ml_collections.ConfigDict, task: ChatTask, tokenizer):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        if not (config.data.dir or config.data.files.train):
            raise ValueError(
                f"data.task={task.name!r} reads local chat records: set data.files.train (and "
                ".validation / .test) to .jsonl / .json files, or data.dir to a directory "
                "holding {split}.jsonl (or .json) or to one such file"
            )

    @staticmethod
    def batch_spec(config: ml_collections.ConfigDict, task: ChatTask) -> dict[str, tuple]:
        """Packed rows of `data.max_length` tokens: next-token labels, per-token weights."""
        shape = (config.train.batch_size, config.data.max_length)
        spec = {k: (shape, np.dtype(np.int32)) for k in ("input_ids", "attention_mask")}
        spec |= {k: (shape, np.dtype(np.int32)) for k in ("segment_ids", "positions", "labels")}
        return spec | {"weights": (shape, np.dtype(np.float32))}

    def conversations(self, split: str) -> list[chat_batches.Conversation]:
        """The records of `split` ("train", "test", "validation" or "holdout") in file order."""
        file_split = selection.file_split(split)
        data = self.config.data
        if data.files[file_split]:  # relative to data.dir when that is set
            records = chat_batches.load_records(
                os.path.join(data.dir, data.files[file_split]), self.task.format, split=file_split
            )
        else:
            records = self._dir_records(split, file_split)
        rows = _rows(self.config, split, len(records))
        return records if rows is None else [records[i] for i in rows]

    def _dir_records(self, split: str, file_split: str) -> list[chat_batches.Conversation]:
        """`data.dir`'s `{split}.jsonl` (or .json), or data.dir itself as the train file."""
        if not self.config.data.dir:
            raise ValueError(
                f"no {file_split} records: set data.files.{file_split} (or data.dir to a "
                f"directory holding {file_split}.jsonl)"
            )
        if file_split != "train" and os.path.isfile(self.config.data.dir):
            # One file is the train split; reading it as another split would evaluate (and
            # select checkpoints) on the training data.
            raise ValueError(
                f"data.dir={self.config.data.dir!r} is a single file, which serves as the "
                f"train split only, not {split!r}: point data.dir at a directory holding "
                f"{file_split}.jsonl, or evaluate on a holdout (data.eval_split='holdout', "
                "data.holdout_rows=N)"
            )
        return chat_batches.load_records(self.config.data.dir, self.task.format, split=file_split)

    def load(self, split: str) -> ChatSplit:
        """Load, render, mask and pack `split`."""
        conversations = self.conversations(split)
        length = self.config.data.max_length
        examples = chat_batches.encode_conversations(conversations, self.tokenizer, length)
        rows = chat_batches.pack(
            examples,
            length,
            packed=self.config.data.packing,
            pad_id=chat_batches.pad_token_id(self.tokenizer),
        )
        return ChatSplit(conversations, rows)

    def train_batches(self) -> _StepBatches:
        """Seeded, resumable batches of packed training rows for this process."""
        return _StepBatches(
            self.load("train").rows,
            batch_size=self.config.train.batch_size,
            seed=self.config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_batches(self, split: ChatSplit) -> Iterator[dict[str, Any]]:
        """Every packed row once, in order; the last batch filled with empty rows."""
        batches = chat_batches.eval_batches(
            split.rows,
            self.config.train.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        return (step_batch(rows) for rows in batches)
