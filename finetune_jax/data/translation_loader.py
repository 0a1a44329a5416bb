"""`TranslationData`: a translation task's splits and batches as the train loop sees them:
(source, target) text pairs tokenized with the model's tokenizer into encoder rows and
teacher-forcing decoder rows, batched by length.

Row layout, [N, data.max_length] each:
  input_ids, attention_mask   the source as `tokenizer(source)` gives it (its own specials,
                              e.g. Marian's closing </s>), cut to max_length, pad-id padded
  decoder_input_ids, decoder_attention_mask, labels, weights
                              `tokenizer(text_target=target)` + EOS (appended when the
                              tokenizer does not end with it), shifted right behind the model's
                              `decoder_start_token_id` (`speech_batches.target_rows`): position
                              t predicts target token t, every target token and the EOS trained
A batch is cut to the smallest of `data.buckets` that holds the longer side of its longest
row (one compiled step shape per bucket). Training batches are seeded and resumable
(`ner_loader.BucketedRowBatches`) and hold rows of like length (`LENGTH_GROUP`); eval batches visit rows shortest first (generation then
runs on rows of like length) and carry `row_ids`, each row's index in its split, so scores
and records go back to the split's order and texts.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from finetune_jax.data import chat_batches, selection, speech_batches, text_batches
from finetune_jax.data.ner_loader import BucketedRowBatches
from finetune_jax.data.translation_sources import Pairs, read_pairs

SOURCE_FIELDS = ("input_ids", "attention_mask")
# Training batches come from groups of this many batches sorted by length (then shuffled):
# on the l10n pairs a batch of 32 pads to 24 tokens on average instead of 85.
LENGTH_GROUP = 64
# Keys of generation_config.json the kind reads, and their config.json fallbacks.
GENERATION_KEYS = (
    "decoder_start_token_id",
    "eos_token_id",
    "pad_token_id",
    "forced_eos_token_id",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "length_penalty",
)


def generation_config(model_dir: str) -> dict[str, Any]:
    """The model's generation settings: generation_config.json, else the same keys of its
    config.json (transformers derives the one from the other)."""
    root = pathlib.Path(model_dir)
    path = root / "generation_config.json"
    settings = json.loads(path.read_text()) if path.is_file() else {}
    config = json.loads((root / "config.json").read_text())
    settings |= {k: config[k] for k in GENERATION_KEYS if k not in settings and k in config}
    for key in ("decoder_start_token_id", "eos_token_id"):
        if settings.get(key) is None:
            raise ValueError(
                f"model directory {model_dir!r} names no {key} (generation_config.json or "
                "config.json): a translation task needs an encoder-decoder model"
            )
    if isinstance(settings["eos_token_id"], list):  # transformers allows several
        settings["eos_token_id"] = settings["eos_token_id"][0]
    return settings


class TranslationSplit:
    """One split: its pairs (texts as written) and their row arrays (module docstring)."""

    def __init__(self, pairs: Pairs, rows: dict[str, np.ndarray]):
        self.pairs, self.rows = pairs, rows
        # The longer side of each row: what its bucket must hold.
        self.lengths = np.maximum(
            rows["attention_mask"].sum(axis=1), rows["decoder_attention_mask"].sum(axis=1)
        )

    def __len__(self) -> int:
        return len(self.pairs)


class TranslationData:
    """Pairs tokenized into rows of `data.max_length` source and target tokens each."""

    def __init__(self, config: ml_collections.ConfigDict, task: Any, tokenizer, model_dir: str):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        self.generation = generation_config(model_dir)
        self.prompt = speech_batches.decoder_prompt(self.generation)
        self.eos_id = int(self.generation["eos_token_id"])
        pad = self.generation.get("pad_token_id", tokenizer.pad_token_id)
        self.pad_id = self.eos_id if pad is None else int(pad)
        self.buckets = text_batches.bucket_lengths(
            config.data.max_length, tuple(config.data.buckets)
        )
        self.evaluated: TranslationSplit | None = None  # the split eval batches last came from

    @staticmethod
    def batch_spec(config: ml_collections.ConfigDict, task: Any) -> dict[str, tuple]:
        """{name: (shape, dtype)} of the largest global training batch (no data read)."""
        shape = (config.train.batch_size, config.data.max_length)
        fields = (*SOURCE_FIELDS, *speech_batches.ROW_FIELDS)
        spec = {k: (shape, np.dtype(np.int32)) for k in fields}
        return spec | {"weights": (shape, np.dtype(np.float32))}

    def load(self, split: str) -> TranslationSplit:
        """`split` ("train", "validation", "test" or "holdout") read and tokenized."""
        pairs = read_pairs(self.task, self.config.data.dir or None, selection.file_split(split))
        rows = selection.config_rows(self.config, split, len(pairs))
        if rows is not None:
            pairs = Pairs(*([column[i] for i in rows] for column in vars(pairs).values()))
        return self.encode(pairs, split)

    def encode(self, pairs: Pairs, split: str) -> TranslationSplit:
        """Source and target rows of `pairs` (targets "" for prediction: only the EOS)."""
        length = self.config.data.max_length
        rows = self.source_rows(self.source_tokens(pairs.sources, split))
        targets = self.target_tokens(pairs.targets)
        cut = speech_batches.truncated(targets, self.prompt, length)
        if cut and jax.process_index() == 0:
            print(
                f"warning: {cut} of {len(targets)} {split} targets exceed data.max_length="
                f"{length} tokens and lose their end (EOS)",
                file=sys.stderr,
            )
        rows |= speech_batches.target_rows(targets, self.prompt, length, self.pad_id)
        return TranslationSplit(pairs, rows)

    def source_tokens(self, sources: Sequence[str], split: str) -> list[list[int]]:
        """Token ids of each source, those longer than `data.max_length` cut by the tokenizer
        (which keeps its closing special tokens), with a warning saying how many."""
        length = self.config.data.max_length
        ids = self.tokenizer(list(sources))["input_ids"]
        long = [i for i, row in enumerate(ids) if len(row) > length]
        if long:
            cut = self.tokenizer([sources[i] for i in long], truncation=True, max_length=length)
            for i, row in zip(long, cut["input_ids"]):
                ids[i] = row
            if jax.process_index() == 0:
                print(
                    f"warning: {len(long)} of {len(ids)} {split} sources exceed "
                    f"data.max_length={length} tokens and lose their end",
                    file=sys.stderr,
                )
        return ids

    def source_rows(self, token_ids: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
        """`input_ids` (pad-id padded) and `attention_mask` [N, data.max_length]."""
        shape = (len(token_ids), self.config.data.max_length)
        ids, mask = np.full(shape, self.pad_id, np.int32), np.zeros(shape, np.int32)
        for r, row in enumerate(token_ids):
            ids[r, : len(row)], mask[r, : len(row)] = row, 1
        return {"input_ids": ids, "attention_mask": mask}

    def target_tokens(self, targets: Sequence[str]) -> list[np.ndarray]:
        """Token ids of each target, ending with EOS (the tokenizer's own, else appended)."""
        ids = self.tokenizer(text_target=list(targets))["input_ids"]
        eos = [self.eos_id]
        return [np.asarray(row if row[-1:] == eos else [*row, *eos], np.int32) for row in ids]

    def train_batches(self) -> BucketedRowBatches:
        """Seeded, resumable training batches for this process, each cut to its bucket."""
        split = self.load("train")
        return BucketedRowBatches(
            split.rows,
            self.buckets,
            lengths=split.lengths,
            group=LENGTH_GROUP,
            batch_size=self.config.train.batch_size,
            seed=self.config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_order(self, split: TranslationSplit) -> np.ndarray:
        """The order eval batches visit rows in: shortest first (stable)."""
        return np.argsort(split.lengths, kind="stable")

    def eval_batches(self, split: TranslationSplit) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, shortest first, each batch cut to its bucket and carrying
        `row_ids`; the last batch filled with weight-0 rows. `split` becomes `evaluated`,
        whose texts the eval's scorer reads."""
        self.evaluated = split
        return self._eval_batches(split)

    def _eval_batches(self, split: TranslationSplit) -> Iterator[dict[str, np.ndarray]]:
        batch_size, process = (
            self.config.train.batch_size,
            (jax.process_index(), jax.process_count()),
        )
        text_batches.check_process_split(batch_size, *process)
        order = self.eval_order(split)
        rows = {**split.rows, "row_ids": np.arange(len(split), dtype=np.int32)}
        for start in range(0, len(split), batch_size):
            chosen = order[start : start + batch_size]
            padded = np.full(batch_size, text_batches.PADDING_ROW, np.int64)
            padded[: len(chosen)] = chosen
            local = text_batches.local_rows(padded, *process)
            batch = chat_batches.take_rows(rows, local)
            # A filler row sees one (pad) source token rather than none: no all-masked softmax.
            batch["attention_mask"][local == text_batches.PADDING_ROW, 0] = 1
            length = text_batches.bucket_for(split.lengths[chosen], self.buckets)
            yield {k: v[:, :length] if v.ndim == 2 else v for k, v in batch.items()}

    def eval_batch_count(self, split: TranslationSplit) -> int:
        """How many batches `eval_batches(split)` yields (for progress)."""
        return -(-len(split) // self.config.train.batch_size)
