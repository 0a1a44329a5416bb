"""Transcription (greedy or beam search) with an encoder-decoder's cached decoding, jitted
at fixed shapes.

One program per (batch, mel, frames) shape runs everything: the encoder once, every decoder
layer's cross-attention K/V once (`init_cache`), a prefill of the decoder prompt, then the
shared decode loop (`decoding.py`: one cached step per token, stopping when every row has
emitted EOS, or transformers' beam search over K beams per clip whose caches are gathered
from their parents'). The model's suppressed tokens are never chosen, its begin-suppressed
ones not first (as transformers' Whisper logits processors do). The module contract:
`models/whisper.py`.

    transcriber = Transcriber(module, generation_config, tokenizer, max_new_tokens=48,
                              num_beams=1)
    texts = transcriber.transcribe(params, input_features_BMF)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.data.speech_batches import decoder_prompt
from finetune_jax.evaluation import decoding, wer


def _transcribe_tokens(
    module: Any,
    prompt: tuple[int, ...],
    eos_id: int,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    params: Any,
    features: jax.Array,
    banned_V: jax.Array,
    banned_first_V: jax.Array,
) -> jax.Array:
    """New tokens [B, max_new_tokens] int32; a row's EOS is kept and repeated after it."""
    apply = functools.partial(module.apply, {"params": params})
    memory_BSD = apply(features, method="encode")
    batch, prompt_len = memory_BSD.shape[0], len(prompt)
    cache = apply(memory_BSD, prompt_len + max_new_tokens, method="init_cache")
    prompt_BP = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (batch, prompt_len))
    logits_B1V, cache = apply(
        prompt_BP, cache=cache, cache_index=0, last_logits_only=True, method="decode"
    )

    def step(previous_B1, t, cache):
        # Feeds the token of generation step t - 1, at decoder slot prompt_len + t - 1.
        logits_B1V, cache = apply(
            previous_B1,
            cache=cache,
            cache_index=prompt_len + t - 1,
            last_logits_only=True,
            method="decode",
        )
        return logits_B1V[:, -1], cache

    def suppress(scores_BV, t):
        banned = banned_V | ((t == 0) & banned_first_V)
        return jnp.where(banned, -jnp.inf, scores_BV)

    if num_beams == 1:
        choose = lambda logits_BV, t: jnp.argmax(suppress(logits_BV, t), axis=-1).astype(jnp.int32)  # noqa: E731
        done_B = jnp.zeros((batch,), bool)
        return decoding.greedy_search(
            step, logits_B1V[:, -1], cache, max_new_tokens, choose, (eos_id,), eos_id, done_B
        )
    # Encoder, cross-attention K/V and prompt once per clip; then K rows per clip.
    logits_BKV, cache = decoding.repeat_beams((logits_B1V[:, -1], cache), num_beams)
    return decoding.beam_search(
        step, logits_BKV, cache, num_beams, max_new_tokens, eos_id, eos_id, length_penalty, suppress
    )


def _mask(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    mask = np.zeros(vocab_size, bool)
    ids = [i for i in token_ids if 0 <= i < vocab_size]  # ids beyond a small vocab: no-ops
    mask[ids] = True
    return mask


class Transcriber:
    """Transcripts of `input_features` batches with an encoder-decoder `module`.

    generation: the model's generation_config.json as a dict (prompt, EOS, suppressed
    tokens, `length_penalty` for beam search, default 1.0); max_new_tokens is capped so that
    prompt + new tokens fit the decoder's positions (`max_target_positions`, 448 for
    Whisper); num_beams 1 is greedy, K > 1 beam search of width K.
    """

    def __init__(
        self,
        module: Any,
        generation: dict[str, Any],
        tokenizer,
        max_new_tokens: int,
        num_beams: int = 1,
    ):
        config = module.config
        self.prompt = tuple(int(i) for i in decoder_prompt(generation))
        self.eos_id = int(generation["eos_token_id"])
        self.tokenizer = tokenizer
        limit = config.max_target_positions - len(self.prompt)
        self.max_new_tokens = max(1, min(int(max_new_tokens), limit))
        self._banned = _mask(generation.get("suppress_tokens") or (), config.vocab_size)
        self._banned_first = _mask(generation.get("begin_suppress_tokens") or (), config.vocab_size)
        if num_beams < 1:
            raise ValueError(f"generate.num_beams={num_beams} must be >= 1 (1 = greedy)")
        if num_beams > 1 and generation.get("early_stopping") not in (None, False):
            raise ValueError(
                f"generation_config.json sets early_stopping={generation['early_stopping']!r}; "
                "beam search here implements transformers' default (false) only"
            )
        self.num_beams = int(num_beams)
        length_penalty = float(generation.get("length_penalty", 1.0))
        self._generate = jax.jit(
            functools.partial(
                _transcribe_tokens,
                module,
                self.prompt,
                self.eos_id,
                self.max_new_tokens,
                self.num_beams,
                length_penalty,
            )
        )

    def tokens(self, params: Any, input_features: Any) -> np.ndarray:
        """New tokens [B, max_new_tokens] int32 (EOS-padded after each row's EOS)."""
        out = self._generate(params, input_features, self._banned, self._banned_first)
        return np.asarray(jax.device_get(out))

    def texts(self, tokens_BN: np.ndarray) -> list[str]:
        """Decoded transcripts, each cut at its first EOS, special tokens dropped."""
        rows = []
        for row in np.asarray(tokens_BN).tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            rows.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return rows

    def transcribe(self, params: Any, input_features: Any) -> list[str]:
        """Transcripts of a batch of features."""
        return self.texts(self.tokens(params, input_features))

    def references(self, labels_BT: np.ndarray, weights_BT: np.ndarray) -> list[str]:
        """The reference transcripts a batch's trained label tokens spell (EOS dropped)."""
        rows = []
        for labels, weights in zip(np.asarray(labels_BT), np.asarray(weights_BT)):
            ids = [int(t) for t, w in zip(labels, weights) if w > 0 and t != self.eos_id]
            rows.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return rows

    def compiled_shapes(self) -> int:
        """How many programs have been compiled (one per input shape)."""
        return self._generate._cache_size()


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
