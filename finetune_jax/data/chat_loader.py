"""`ChatData`: a causal-LM SFT task's splits and batches as the train loop sees them: chat
records rendered with the tokenizer's chat template, loss on assistant tokens, several
examples packed per row."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from finetune_jax.data import chat_batches, selection


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

    def __init__(self, config: ml_collections.ConfigDict, task: Any, tokenizer):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        if not (config.data.dir or config.data.files.train):
            raise ValueError(
                f"data.task={task.name!r} reads local chat records: set data.files.train (and "
                ".validation / .test) to .jsonl / .json files, or data.dir to a directory "
                "holding {split}.jsonl (or .json) or to one such file"
            )

    @staticmethod
    def batch_spec(config: ml_collections.ConfigDict, task: Any) -> dict[str, tuple]:
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
        rows = selection.config_rows(self.config, split, len(records))
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

    def eval_batch_count(self, split: ChatSplit) -> int:
        """How many batches `eval_batches(split)` yields (for progress): its packed rows'."""
        return -(-len(split.rows["input_ids"]) // self.config.train.batch_size)
