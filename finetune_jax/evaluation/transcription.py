"""Transcription (greedy or beam search) with an encoder-decoder's cached decoding: the
shared encoder-decoder generator (`seq2seq_generation.py`) on log-mel features, and the scorer
that turns each eval batch's transcripts into WER / CER. The model's suppressed tokens are never
chosen, its begin-suppressed ones not first (as transformers' Whisper logits processors do).
The module contract: `models/whisper.py`.

    transcriber = Transcriber(module, generation_config, tokenizer, max_new_tokens=48,
                              num_beams=1)
    texts = transcriber.transcribe(params, input_features_BMF)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from finetune_jax.evaluation import wer
from finetune_jax.evaluation.seq2seq_generation import Seq2SeqGenerator


class Transcriber(Seq2SeqGenerator):
    """Transcripts of `input_features` batches with an encoder-decoder `module` (see
    `Seq2SeqGenerator`); max_new_tokens is capped so that prompt + new tokens fit the
    decoder's positions (`max_target_positions`, 448 for Whisper)."""

    def __init__(
        self,
        module: Any,
        generation: dict[str, Any],
        tokenizer,
        max_new_tokens: int,
        num_beams: int = 1,
    ):
        super().__init__(
            module,
            generation,
            tokenizer,
            max_new_tokens,
            module.config.max_target_positions,
            num_beams,
        )

    def tokens(self, params: Any, input_features: Any) -> np.ndarray:
        """New tokens [B, max_new_tokens] int32 (EOS-padded after each row's EOS)."""
        return self.generate(params, {"input_features": input_features})

    def transcribe(self, params: Any, input_features: Any) -> list[str]:
        """Transcripts of a batch of features."""
        return self.texts(self.tokens(params, input_features))


class TranscriptScorer:
    """The evaluator's scorer for speech recognition: every real row of each eval batch
    transcribed, scored against the reference its labels spell (WER / CER); records
    {"reference", "hypothesis"} per row, in order."""

    def __init__(self, transcriber: Transcriber):
        self.transcriber = transcriber
        self._references: list[str] = []
        self._hypotheses: list[str] = []

    def add(self, params: Any, device_batch: dict[str, Any], out: dict[str, Any], keep) -> None:
        tokens = self.transcriber.tokens(params, device_batch["input_features"])
        real = np.asarray(keep).any(axis=1)  # filler rows of the last batch train no token
        labels, weights = np.asarray(out["labels"]), np.asarray(out["weights"])
        self._references += self.transcriber.references(labels[real], weights[real])
        self._hypotheses += self.transcriber.texts(tokens[real])

    def result(self) -> tuple[dict[str, Any], list[dict[str, str]]]:
        references, hypotheses = self._references, self._hypotheses
        self._references, self._hypotheses = [], []
        metrics = {**wer.error_rates(references, hypotheses), "transcribed": len(hypotheses)}
        records = [{"reference": r, "hypothesis": h} for r, h in zip(references, hypotheses)]
        return metrics, records
