"""Generation with an encoder-decoder (greedy or beam search), jitted at fixed shapes: what
speech transcripts and text translations share.

One program per encoder-input shape runs everything: the encoder once, every decoder layer's
cross-attention K/V once (`init_cache`), a prefill of the decoder prompt, then the shared
decode loop (`decoding.py`: one cached step per token, stopping when every row has emitted
EOS, or transformers' beam search over K beams per input whose caches are gathered from their
parents'). The encoder inputs are whatever the module's `encode` takes: Whisper's
`input_features`, a text model's `input_ids` + `attention_mask` (the mask is then the
`memory_mask` of every decoder call). The module contract: `models/whisper.py`.

The generation config (the model's generation_config.json) says which tokens are never
chosen (`suppress_tokens`, and the single-token lists of `bad_words_ids`, as transformers'
Marian configs ban the pad token), which not first (`begin_suppress_tokens`), and
`forced_eos_token_id`: at the last of `max_new_tokens` steps only EOS may come, as
transformers' ForcedEOSTokenLogitsProcessor does at `max_length`.

    generator = Seq2SeqGenerator(module, generation, tokenizer, max_new_tokens=48,
                                 max_positions=448, num_beams=1)
    tokens_BN = generator.generate(params, {"input_ids": ids, "attention_mask": mask})
    texts = generator.texts(tokens_BN)
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.data.speech_batches import decoder_prompt
from finetune_jax.evaluation import decoding


def _generate_tokens(
    module: Any,
    prompt: tuple[int, ...],
    eos_id: int,
    max_new_tokens: int,
    num_beams: int,
    length_penalty: float,
    force_eos: bool,
    params: Any,
    encoder_inputs: dict[str, jax.Array],
    banned_V: jax.Array,
    banned_first_V: jax.Array,
) -> jax.Array:
    """New tokens [B, max_new_tokens] int32; a row's EOS is kept and repeated after it."""
    apply = functools.partial(module.apply, {"params": params})
    memory_BSD = apply(**encoder_inputs, method="encode")
    memory_mask = encoder_inputs.get("attention_mask")  # text encoders' padding; None for audio
    batch, prompt_len = memory_BSD.shape[0], len(prompt)
    cache = apply(memory_BSD, prompt_len + max_new_tokens, method="init_cache")
    prompt_BP = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (batch, prompt_len))
    logits_BV, cache = _decode(apply, prompt_BP, memory_mask, cache, 0)
    last_step = max_new_tokens - 1 if force_eos else None
    suppress = _suppressor(banned_V, banned_first_V, eos_id, last_step)
    if num_beams > 1:
        # Encoder, cross-attention K/V and prompt once per input; then K rows per input
        # (a beam's memory mask is its input's: beams never change input, so no gathering).
        logits_BV, cache, memory_mask = decoding.repeat_beams(
            (logits_BV, cache, memory_mask), num_beams
        )

    def step(previous_B1, t, cache):
        # Feeds the token of generation step t - 1, at decoder slot prompt_len + t - 1.
        return _decode(apply, previous_B1, memory_mask, cache, prompt_len + t - 1)

    if num_beams == 1:
        choose = lambda logits_BV, t: jnp.argmax(suppress(logits_BV, t), axis=-1).astype(jnp.int32)  # noqa: E731
        done_B = jnp.zeros((batch,), bool)
        return decoding.greedy_search(
            step, logits_BV, cache, max_new_tokens, choose, (eos_id,), eos_id, done_B
        )
    return decoding.beam_search(
        step, logits_BV, cache, num_beams, max_new_tokens, eos_id, eos_id, length_penalty, suppress
    )


def _decode(apply, tokens_BT, memory_mask, cache, cache_index):
    """(logits [B, V] after feeding `tokens_BT` at slots `cache_index`..., the new cache)."""
    logits_B1V, cache = apply(
        tokens_BT,
        memory_mask=memory_mask,
        cache=cache,
        cache_index=cache_index,
        last_logits_only=True,
        method="decode",
    )
    return logits_B1V[:, -1], cache


def _suppressor(banned_V, banned_first_V, eos_id: int, last_step: int | None):
    """(scores [B, V], step t) -> scores with the tokens never chosen at -inf: `banned_V`,
    `banned_first_V` at t == 0, and all but EOS at `last_step` (None: no forced EOS)."""
    eos_only_V = jnp.arange(banned_V.shape[0]) != eos_id

    def suppress(scores_BV, t):
        banned = banned_V | ((t == 0) & banned_first_V)
        if last_step is not None:
            banned = jnp.where(t == last_step, eos_only_V, banned)
        return jnp.where(banned, -jnp.inf, scores_BV)

    return suppress


def _mask(token_ids: Sequence[int], vocab_size: int) -> np.ndarray:
    mask = np.zeros(vocab_size, bool)
    ids = [i for i in token_ids if 0 <= i < vocab_size]  # ids beyond a small vocab: no-ops
    mask[ids] = True
    return mask


def banned_tokens(generation: dict[str, Any]) -> list[int]:
    """Token ids generation never chooses: `suppress_tokens` and every single-token list of
    `bad_words_ids` (longer lists ban sequences, which this loop does not implement)."""
    bad_words = generation.get("bad_words_ids") or ()
    longer = [words for words in bad_words if len(words) != 1]
    if longer:
        raise ValueError(
            f"generation_config.json's bad_words_ids holds multi-token sequences {longer[:3]}; "
            "only single tokens can be banned here: remove them"
        )
    return [*(generation.get("suppress_tokens") or ()), *(w[0] for w in bad_words)]


class Seq2SeqGenerator:
    """Generated token rows and their texts for batches of encoder inputs.

    generation: the model's generation_config.json as a dict (prompt, EOS, banned tokens,
    `length_penalty` for beam search, default 1.0); max_new_tokens is capped so that prompt +
    new tokens fit `max_positions` (the decoder's position table); num_beams 1 is greedy,
    K > 1 beam search of width K.
    """

    def __init__(
        self,
        module: Any,
        generation: dict[str, Any],
        tokenizer,
        max_new_tokens: int,
        max_positions: int,
        num_beams: int = 1,
    ):
        vocab_size = module.config.vocab_size
        self.prompt = tuple(int(i) for i in decoder_prompt(generation))
        self.eos_id = int(generation["eos_token_id"])
        self.tokenizer = tokenizer
        self.max_new_tokens = max(1, min(int(max_new_tokens), max_positions - len(self.prompt)))
        self._banned = _mask(banned_tokens(generation), vocab_size)
        self._banned_first = _mask(generation.get("begin_suppress_tokens") or (), vocab_size)
        if num_beams < 1:
            raise ValueError(f"generate.num_beams={num_beams} must be >= 1 (1 = greedy)")
        if num_beams > 1 and generation.get("early_stopping") not in (None, False):
            raise ValueError(
                f"generation_config.json sets early_stopping={generation['early_stopping']!r}; "
                "beam search here implements transformers' default (false) only"
            )
        self.num_beams = int(num_beams)
        forced = generation.get("forced_eos_token_id")
        if forced is not None and int(forced) != self.eos_id:
            raise ValueError(
                f"generation_config.json's forced_eos_token_id={forced} is not its "
                f"eos_token_id={self.eos_id}; one EOS id is supported"
            )
        self._generate = jax.jit(
            functools.partial(
                _generate_tokens,
                module,
                self.prompt,
                self.eos_id,
                self.max_new_tokens,
                self.num_beams,
                float(generation.get("length_penalty", 1.0)),
                forced is not None,
            )
        )

    def generate(self, params: Any, encoder_inputs: dict[str, Any]) -> np.ndarray:
        """New tokens [B, max_new_tokens] int32 (EOS-padded after each row's EOS)."""
        out = self._generate(params, encoder_inputs, self._banned, self._banned_first)
        return np.asarray(jax.device_get(out))

    def texts(self, tokens_BN: np.ndarray) -> list[str]:
        """Decoded texts, each cut at its first EOS, special tokens dropped."""
        rows = []
        for row in np.asarray(tokens_BN).tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            rows.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return rows

    def references(self, labels_BT: np.ndarray, weights_BT: np.ndarray) -> list[str]:
        """The reference texts a batch's trained label tokens spell (EOS dropped)."""
        rows = []
        for labels, weights in zip(np.asarray(labels_BT), np.asarray(weights_BT)):
            ids = [int(t) for t, w in zip(labels, weights) if w > 0 and t != self.eos_id]
            rows.append(self.tokenizer.decode(ids, skip_special_tokens=True).strip())
        return rows

    def compiled_shapes(self) -> int:
        """How many programs have been compiled (one per input shape)."""
        return self._generate._cache_size()
