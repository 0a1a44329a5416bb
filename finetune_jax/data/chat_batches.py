"""Supervised fine-tuning data: chat records -> assistant-only masks -> packed rows -> batches.

  load_records          GSM8K / `messages` / Alpaca files -> conversations of {"role", "content"}
  encode_conversations  chat template -> (input_ids int32 [n], trained bool [n]) per conversation
  pack                  examples -> fixed-length rows, several per row (or one, packed=False)
  SFTBatches            seeded, resumable, per-process training batches of rows
  eval_batches          every row once, in order; the last batch filled with empty rows

Row fields, each [L] (`pack` stacks them to [R, L], batches hold [B, L]):
  input_ids       int32    the tokens; pad_id after the last segment
  targets         int32    the next token of the same segment (pad_id at a segment's last token)
  loss_mask       float32  1 where targets[i] is a trained (assistant) token, else 0
  segment_ids     int32    1, 2, 3, ... per example in the row; 0 = padding
  positions       int32    0, 1, ... restarting at every segment (0 on padding)
  attention_mask  int32    1 on real tokens
A causal LM fed (input_ids, attention_mask, segment_ids, positions) sees each example as if it
were alone in its row, so `losses.causal_lm_loss` over a packed batch equals the unpacked one.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Sequence

import numpy as np

from finetune_jax.data.chat_sources import Conversation, load_records  # noqa: F401 (re-export)
from finetune_jax.data.text_batches import (
    PADDING_ROW,
    EpochOrder,
    OrderedBatches,
    check_process_split,
    local_rows,
)

ROW_FIELDS = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "attention_mask")

Example = tuple[np.ndarray, np.ndarray]  # (input_ids int32 [n], trained bool [n])


def pad_token_id(tokenizer) -> int:
    """The id that pads rows and finished generations: the tokenizer's pad, else its eos."""
    pad = tokenizer.pad_token_id
    return tokenizer.eos_token_id if pad is None else pad


class TemplateError(ValueError):
    """A chat template whose renderings cannot locate the assistant tokens."""


# --------------------------------------------------------------------------------- encoding


def encode_conversation(
    messages: Conversation, tokenizer, max_length: int, end_token: str | None = None
) -> Example:
    """One conversation; see `encode_conversations`."""
    return encode_conversations([messages], tokenizer, max_length, end_token)[0]


def encode_conversations(
    conversations: Sequence[Conversation], tokenizer, max_length: int, end_token: str | None = None
) -> list[Example]:
    """Renders with the tokenizer's chat template; marks only assistant replies as trained.

    For the assistant message k, the trained tokens are those between the rendering of
    messages[:k] with the generation prompt (for ChatML, "...<|im_start|>assistant\\n") and
    the rendering of messages[:k+1], up to and including the last `end_token` (default: the
    tokenizer's eos, "<|im_end|>" for SmolLM2) in that span. So for ChatML the trained tokens
    are exactly `content + "<|im_end|>"`: not the role header, not the "\\n" after <|im_end|>,
    nothing of system or user turns. Every rendering must tokenize to a prefix of the whole
    conversation's tokens, else `TemplateError`. Sequences are truncated to `max_length`
    tokens, keeping the start. All renderings are tokenized in one batched call.
    """
    end_token = tokenizer.eos_token if end_token is None else end_token
    end_id = tokenizer.convert_tokens_to_ids(end_token) if end_token is not None else None
    unknown = end_id == tokenizer.unk_token_id and end_token != tokenizer.unk_token
    if end_id is None or unknown:
        raise TemplateError(f"end token {end_token!r} is not in the vocabulary; pass end_token")
    texts: list[str] = []
    plans = []  # per conversation: (index of the whole rendering, [(k, open, close) indices])

    def add(text: str) -> int:
        texts.append(text)
        return len(texts) - 1

    for messages in conversations:
        whole = add(_render(tokenizer, messages))
        turns = []
        for k, message in enumerate(messages):
            if message["role"] == "assistant":
                opened = add(_render(tokenizer, messages[:k], add_generation_prompt=True))
                # A final assistant turn's closing rendering is the whole one: tokenize it once.
                last = k + 1 == len(messages)
                closed = whole if last else add(_render(tokenizer, messages[: k + 1]))
                turns.append((k, opened, closed))
        plans.append((whole, turns))
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    examples = []
    for whole, turns in plans:
        ids, trained = _assistant_tokens(token_ids, whole, turns, end_id, end_token)
        examples.append((ids[:max_length], trained[:max_length]))
    return examples


def _render(tokenizer, messages: Conversation, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def _assistant_tokens(
    token_ids: list[list[int]],
    whole: int,
    turns: list[tuple[int, int, int]],
    end_id: int,
    end_token: str,
) -> Example:
    """Trained-token mask from the tokenized renderings `encode_conversations` laid out."""
    full = token_ids[whole]
    trained = np.zeros(len(full), bool)
    for k, opened, closed in turns:
        opened, closed = token_ids[opened], token_ids[closed]
        for prefix, count, prompt in ((opened, k, True), (closed, k + 1, False)):
            if full[: len(prefix)] != prefix:
                raise TemplateError(
                    f"chat template is not prefix-stable: messages[:{count}] rendered with "
                    f"add_generation_prompt={prompt} does not tokenize to a prefix of the whole "
                    "conversation, so the assistant tokens cannot be located"
                )
        ends = np.flatnonzero(np.asarray(full[len(opened) : len(closed)]) == end_id)
        if not ends.size:
            raise TemplateError(f"assistant message {k} is not closed by {end_token!r}")
        trained[len(opened) : len(opened) + ends[-1] + 1] = True
    return np.asarray(full, np.int32), trained


# ---------------------------------------------------------------------------------- packing


def pack(
    examples: Sequence[Example], row_length: int, *, packed: bool = True, pad_id: int = 0
) -> dict[str, np.ndarray]:
    """Lays examples into [R, row_length] rows (fields: see the module docstring).

    packed=True: best-fit decreasing (longest example first, into the fullest row that still
    has room, ties to the earliest row), deterministic; an example never straddles rows.
    packed=False: one example per row, in order. Examples longer than `row_length` are
    truncated to their first `row_length` tokens.
    """
    if row_length < 2:
        raise ValueError(f"row_length must be at least 2, got {row_length}")
    examples = [(np.asarray(i)[:row_length], np.asarray(t, bool)[:row_length]) for i, t in examples]
    if any(len(ids) == 0 for ids, _ in examples):
        raise ValueError("empty example: every example needs at least one token")
    lengths = [len(ids) for ids, _ in examples]
    layout = (
        _best_fit_decreasing(lengths, row_length) if packed else [[i] for i in range(len(lengths))]
    )
    shape = (len(layout), row_length)
    rows = {name: np.zeros(shape, np.int32) for name in ROW_FIELDS}
    rows["loss_mask"] = np.zeros(shape, np.float32)
    rows["input_ids"][:] = pad_id
    rows["targets"][:] = pad_id
    for r, members in enumerate(layout):
        start = 0
        for segment, index in enumerate(members, 1):
            ids, trained = examples[index]
            end = start + len(ids)
            rows["input_ids"][r, start:end] = ids
            # Targets stop at the segment's last token: its "next token" is another example.
            rows["targets"][r, start : end - 1] = ids[1:]
            rows["loss_mask"][r, start : end - 1] = trained[1:]
            rows["segment_ids"][r, start:end] = segment
            rows["positions"][r, start:end] = np.arange(len(ids))
            rows["attention_mask"][r, start:end] = 1
            start = end
    return rows


def _best_fit_decreasing(lengths: Sequence[int], row_length: int) -> list[list[int]]:
    """Example indices per row; `free` is a sorted list of (room left, row) of open rows."""
    layout: list[list[int]] = []
    free: list[tuple[int, int]] = []
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(free, (lengths[index], -1))
        if slot == len(free):
            layout.append([index])
            row, room = len(layout) - 1, row_length - lengths[index]
        else:
            room, row = free.pop(slot)
            layout[row].append(index)
            room -= lengths[index]
        if room > 0:
            bisect.insort(free, (room, row))
    return layout


def packing_efficiency(rows: dict[str, np.ndarray]) -> float:
    """Fraction of row positions that hold real tokens (1.0 = no padding)."""
    return float(rows["attention_mask"].mean()) if rows["attention_mask"].size else 0.0


# -------------------------------------------------------------------------------- batching


def take_rows(rows: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, np.ndarray]:
    """Rows at `indices`; PADDING_ROW (-1) gives an all-zero row (no tokens, no loss)."""
    indices = np.asarray(indices, np.int64)
    padding = indices == PADDING_ROW
    batch = {name: array[np.where(padding, 0, indices)] for name, array in rows.items()}
    for array in batch.values():
        array[padding] = 0
    return batch


class SFTBatches(OrderedBatches):
    """Infinite, resumable iterator over shuffled batches of packed rows.

    Epoch e visits `np.random.default_rng([seed, e]).permutation(num_rows)` in `batch_size`
    slices (global batches; the incomplete last one is dropped); this process yields its
    contiguous `batch_size // process_count` rows of each. The order depends only on (seed,
    epoch), never on process_count. `state()` / `restore()` save and resume the position.
    """

    def __init__(
        self,
        rows: dict[str, np.ndarray],
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        check_process_split(batch_size, process_index, process_count)
        self.order = EpochOrder(len(rows["input_ids"]), batch_size, seed)
        self._rows = rows
        self._process = (process_index, process_count)

    def __next__(self) -> dict[str, np.ndarray]:
        return take_rows(self._rows, local_rows(self.order.next_rows(), *self._process))


def eval_batches(
    rows: dict[str, np.ndarray], batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every row once, in order, as batches of `batch_size // process_count` rows.

    The last global batch is filled with all-zero rows (loss_mask 0), so shapes never change
    and every process yields the same number of batches.
    """
    if batch_size <= 0 or batch_size % process_count:
        raise ValueError(
            f"batch_size {batch_size} must be positive and divisible by {process_count}"
        )
    num_rows = len(rows["input_ids"])
    for start in range(0, num_rows, batch_size):
        padded = np.full(batch_size, PADDING_ROW, np.int64)
        padded[: min(batch_size, num_rows - start)] = np.arange(
            start, min(start + batch_size, num_rows)
        )
        yield take_rows(rows, local_rows(padded, process_index, process_count))
