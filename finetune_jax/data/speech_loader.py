"""A speech task's data as the train loop sees it (the speech_recognition kind):
audio rows -> cached log-mel features + teacher-forcing target rows -> batches.

Batches follow the step's contract: model inputs (`input_features`, `decoder_input_ids`,
`decoder_attention_mask`) plus per-token `labels` and `weights`, so the one train step and
the next-token loss serve it as they serve causal-LM SFT.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from finetune_jax.data import audio_features, audio_sources, selection, speech_batches


@dataclasses.dataclass
class SpeechSplit:
    """One split: transcripts (references), features and the target rows, row-aligned."""

    texts: list[str]
    features: audio_features.Features
    rows: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.texts)


def generation_config(model_dir: str) -> dict[str, Any]:
    """The model directory's generation_config.json (prompt, EOS, suppressed tokens)."""
    path = pathlib.Path(model_dir) / "generation_config.json"
    if not path.is_file():
        raise ValueError(
            f"model directory {model_dir!r} has no generation_config.json, which defines the "
            "decoder's start tokens; a speech task needs a speech model's directory"
        )
    return json.loads(path.read_text())


class SpeechData:
    """Clips featurised by the model's extractor (window `data.audio_seconds`), transcripts
    tokenized into prompt + text + EOS rows of `data.max_length` decoder tokens."""

    def __init__(self, config: ml_collections.ConfigDict, task: Any, tokenizer, model_dir: str):
        self.config, self.task, self.tokenizer = config, task, tokenizer
        self.model_dir = model_dir
        self.generation = generation_config(model_dir)
        self.prompt = speech_batches.decoder_prompt(self.generation)
        self.eos_id = int(self.generation.get("eos_token_id", tokenizer.eos_token_id))
        pad = self.generation.get("pad_token_id", tokenizer.pad_token_id)
        self.pad_id = self.eos_id if pad is None else int(pad)
        self.extractor = audio_features.load_extractor(model_dir)

    def window(self) -> tuple[int, int]:
        """(samples, feature frames) of the input window (`data.audio_seconds`)."""
        return audio_features.window_frames(self.extractor, self.config.data.audio_seconds)

    @staticmethod
    def batch_spec(config: ml_collections.ConfigDict, task: Any, extractor=None) -> dict:
        """{name: (shape, dtype)} of a global batch; the mel count and window come from
        `extractor` (default: Whisper's 80 bins at 100 frames per second)."""
        rows, length = config.train.batch_size, config.data.max_length
        mel = 80 if extractor is None else extractor.feature_size
        seconds = config.data.audio_seconds
        frames = (
            int(seconds * 100) // 2 * 2
            if extractor is None
            else audio_features.window_frames(extractor, seconds)[1]
        )
        tokens = ((rows, length), np.dtype(np.int32))
        return {
            "input_features": ((rows, mel, frames), np.dtype(np.float32)),
            "decoder_input_ids": tokens,
            "decoder_attention_mask": tokens,
            "labels": tokens,
            "weights": ((rows, length), np.dtype(np.float32)),
        }

    def rows(self, split: str) -> list[audio_sources.AudioRow]:
        """The audio rows of `split` ("train", "validation", "test" or "holdout")."""
        data = self.config.data
        rows = audio_sources.load_rows(
            data.dir,
            selection.file_split(split),
            hub_dataset=data.hub_name,
            audio_column=data.audio_column,
            text_column=data.transcript_column,
        )
        chosen = selection.config_rows(self.config, split, len(rows))
        return rows if chosen is None else [rows[i] for i in chosen]

    def load(self, split: str) -> SpeechSplit:
        """Rows of `split` -> cached features and target rows."""
        rows = self.rows(split)
        data = self.config.data
        features = audio_features.split_features(
            rows, self.extractor, data.audio_seconds, data.cache_dir, label=split
        )
        texts = [row.text for row in rows]
        targets = speech_batches.encode_targets(texts, self.tokenizer, self.eos_id)
        cut = speech_batches.truncated(targets, self.prompt, data.max_length)
        if cut and jax.process_index() == 0:
            print(
                f"warning: {cut} of {len(targets)} {split} transcripts exceed "
                f"data.max_length={data.max_length} decoder tokens and lose their end (EOS)",
                file=sys.stderr,
            )
        target_rows = speech_batches.target_rows(targets, self.prompt, data.max_length, self.pad_id)
        return SpeechSplit(texts, features, target_rows)

    def train_batches(self) -> speech_batches.SpeechBatches:
        """Seeded, resumable training batches for this process."""
        split = self.load("train")
        return speech_batches.SpeechBatches(
            split.rows,
            split.features,
            batch_size=self.config.train.batch_size,
            seed=self.config.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_batches(self, split: SpeechSplit) -> Iterator[dict[str, np.ndarray]]:
        """Every row once, in order; the last batch filled with weight-0 rows."""
        return speech_batches.eval_batches(
            split.rows,
            split.features,
            self.config.train.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )

    def eval_batch_count(self, split: SpeechSplit) -> int:
        """How many batches `eval_batches(split)` yields (for progress)."""
        return -(-len(split) // self.config.train.batch_size)
