"""Sequence-to-sequence targets for teacher forcing, and batches of (features, targets).

  decoder_prompt    the generation config's start tokens: [decoder_start, no_timestamps]
  encode_targets    transcripts -> int32 token rows [n] (" " + text, then EOS)
  target_rows       prompt + tokens -> the decoder's input and labels at a fixed length
  SpeechBatches       seeded, resumable training batches; `eval_batches` every row once

Row layout, [L] each (`full = prompt + tokens + [eos]`, T = len(full) - 1 <= L):
  decoder_input_ids       int32    full[:-1], then pad_id
  decoder_attention_mask  int32    1 on the T real positions
  labels                  int32    full[1:] (position t predicts token t + 1), then pad_id
  weights                 float32  1 where labels[t] is a transcript token or the EOS; the
                                   prompt's own continuation (no_timestamps after start) and
                                   the padding are not trained
Batches add `input_features` [B, mel, frames] float32 from `audio_features.Features`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from finetune_jax.data.audio_features import Features
from finetune_jax.data.text_batches import (
    PADDING_ROW,
    EpochOrder,
    OrderedBatches,
    check_process_split,
    local_rows,
)

ROW_FIELDS = ("decoder_input_ids", "decoder_attention_mask", "labels", "weights")


def decoder_prompt(generation_config: dict[str, Any]) -> tuple[int, ...]:
    """The tokens every transcript follows, as the model's generation config defines them:
    the decoder start (start-of-transcript) and, when the model has one, no-timestamps."""
    start = generation_config.get("decoder_start_token_id")
    if start is None:
        raise ValueError("the model's generation config has no decoder_start_token_id")
    no_timestamps = generation_config.get("no_timestamps_token_id")
    return (start,) if no_timestamps is None else (start, no_timestamps)


def encode_targets(texts: Sequence[str], tokenizer, eos_id: int) -> list[np.ndarray]:
    """Token ids of each transcript followed by EOS. Whisper writes a transcript with a
    leading space (" turn on the lights"), which is how its tokenizer's words begin."""
    texts = [" " + text.strip() for text in texts]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray([*row, eos_id], np.int32) for row in ids]


def target_rows(
    targets: Sequence[np.ndarray], prompt: Sequence[int], length: int, pad_id: int
) -> dict[str, np.ndarray]:
    """[N, length] row fields (see the module docstring). A target too long for the row is
    cut, keeping its start; its EOS is then lost, which is why `data.max_length` should
    hold the longest transcript (the loader reports how many were cut)."""
    if length <= len(prompt):
        raise ValueError(f"row length {length} leaves no room after the {len(prompt)}-token prompt")
    rows = {name: np.zeros((len(targets), length), np.int32) for name in ROW_FIELDS}
    rows["weights"] = np.zeros((len(targets), length), np.float32)
    rows["decoder_input_ids"][:] = pad_id
    rows["labels"][:] = pad_id
    for r, tokens in enumerate(targets):
        full = np.concatenate([np.asarray(prompt, np.int32), tokens])[: length + 1]
        steps = len(full) - 1
        rows["decoder_input_ids"][r, :steps] = full[:-1]
        rows["decoder_attention_mask"][r, :steps] = 1
        rows["labels"][r, :steps] = full[1:]
        rows["weights"][r, len(prompt) - 1 : steps] = 1.0  # labels from the first text token
    return rows


def truncated(targets: Sequence[np.ndarray], prompt: Sequence[int], length: int) -> int:
    """How many targets `target_rows` cuts at `length`."""
    return sum(len(prompt) + len(t) - 1 > length for t in targets)


def _take(rows: dict[str, np.ndarray], features: Features, indices: np.ndarray) -> dict:
    indices = np.asarray(indices, np.int64)
    padding = indices == PADDING_ROW
    batch = {name: rows[name][np.where(padding, 0, indices)] for name in ROW_FIELDS}
    for array in batch.values():
        array[padding] = 0  # filler rows: no tokens, weight 0
    batch["input_features"] = features.take(indices)
    return batch


class SpeechBatches(OrderedBatches):
    """Infinite, resumable iterator over shuffled training batches (the order and resume of
    `EpochOrder`, as every training iterator); this process takes its slice of each."""

    def __init__(
        self,
        rows: dict[str, np.ndarray],
        features: Features,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        check_process_split(batch_size, process_index, process_count)
        if len(features) != len(rows["labels"]):
            raise ValueError(f"{len(features)} feature rows for {len(rows['labels'])} targets")
        self.order = EpochOrder(len(features), batch_size, seed)
        self._rows, self._features = rows, features
        self._process = (process_index, process_count)

    def __next__(self) -> dict[str, np.ndarray]:
        rows = local_rows(self.order.next_rows(), *self._process)
        return _take(self._rows, self._features, rows)


def eval_batches(
    rows: dict[str, np.ndarray],
    features: Features,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Every row once, in order; the last global batch filled with weight-0 rows."""
    check_process_split(batch_size, process_index, process_count)
    num_rows = len(features)
    for start in range(0, num_rows, batch_size):
        padded = np.full(batch_size, PADDING_ROW, np.int64)
        stop = min(start + batch_size, num_rows)
        padded[: stop - start] = np.arange(start, stop)
        yield _take(rows, features, local_rows(padded, process_index, process_count))
