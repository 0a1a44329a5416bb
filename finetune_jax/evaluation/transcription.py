"""Greedy transcription with an encoder-decoder's cached decoding, jitted at fixed shapes.

One program per (batch, mel, frames) shape runs everything: the encoder once, every decoder
layer's cross-attention K/V once (`init_cache`), a prefill of the decoder prompt, then a
`lax.while_loop` of one cached step per token that stops when every row has emitted EOS.
The model's suppressed tokens are never chosen, its begin-suppressed ones not first (as
transformers' Whisper logits processors do). The module contract: `models/whisper.py`.

    transcriber = Transcriber(module, generation_config, tokenizer, max_new_tokens=48)
    texts = transcriber.transcribe(params, input_features_BMF)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from finetune_jax.data.seq2seq_batches import decoder_prompt


def _greedy_tokens(
    module: Any,
    prompt: tuple[int, ...],
    eos_id: int,
    max_new_tokens: int,
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

    def pick(logits_BV, banned_V):
        return jnp.argmax(jnp.where(banned_V, -jnp.inf, logits_BV), axis=-1).astype(jnp.int32)

    token_B = pick(logits_B1V[:, -1], banned_V | banned_first_V)
    out_BN = jnp.full((batch, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(token_B)

    def cond(state):
        step, _, done_B, _ = state
        return (step < max_new_tokens) & ~jnp.all(done_B)

    def body(state):
        # Feed token step - 1 (decoder slot prompt_len + step - 1), choose token `step`.
        step, cache, done_B, out_BN = state
        previous_B1 = lax.dynamic_slice_in_dim(out_BN, step - 1, 1, axis=1)
        logits_B1V, cache = apply(
            previous_B1,
            cache=cache,
            cache_index=prompt_len + step - 1,
            last_logits_only=True,
            method="decode",
        )
        token_B = jnp.where(done_B, eos_id, pick(logits_B1V[:, -1], banned_V))
        out_BN = lax.dynamic_update_slice_in_dim(out_BN, token_B[:, None], step, axis=1)
        return step + 1, cache, done_B | (token_B == eos_id), out_BN

    state = (jnp.int32(1), cache, token_B == eos_id, out_BN)
    return lax.while_loop(cond, body, state)[3]


def _mask(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    mask = np.zeros(vocab_size, bool)
    ids = [i for i in token_ids if 0 <= i < vocab_size]  # ids beyond a small vocab: no-ops
    mask[ids] = True
    return mask


class Transcriber:
    """Greedy transcripts of `input_features` batches with a seq2seq `module`.

    generation: the model's generation_config.json as a dict (prompt, EOS, suppressed
    tokens); max_new_tokens is capped so that prompt + new tokens fit the decoder's
    positions (`max_target_positions`, 448 for Whisper).
    """

    def __init__(self, module: Any, generation: dict[str, Any], tokenizer, max_new_tokens: int):
        config = module.config
        self.prompt = tuple(int(i) for i in decoder_prompt(generation))
        self.eos_id = int(generation["eos_token_id"])
        self.tokenizer = tokenizer
        limit = config.max_target_positions - len(self.prompt)
        self.max_new_tokens = max(1, min(int(max_new_tokens), limit))
        self._banned = _mask(generation.get("suppress_tokens") or (), config.vocab_size)
        self._banned_first = _mask(generation.get("begin_suppress_tokens") or (), config.vocab_size)
        self._generate = jax.jit(
            functools.partial(_greedy_tokens, module, self.prompt, self.eos_id, self.max_new_tokens)
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
