"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning"; HF PEFT's `PromptTuningConfig`): `num_virtual_tokens` trained embeddings
[n, hidden] prepended to a sequence's input embeddings, everything else frozen.

The model families that take them (`ModelFamily.word_embeddings` set: BERT, Llama) call
these helpers where their input embeddings are formed, as PEFT's `PeftModel.forward`
does outside the transformers model:

- the virtual tokens come first, at positions 0..n-1, the real tokens at n.. (PEFT drops
  `position_ids` and lets the model count from 0); packed rows (`segment_ids`) shift every
  segment's positions by n and let each segment see the virtual tokens (`shared_keys` of
  `attention.attention_mask`), which is prompt tuning of each example on its own;
- the attention mask gets n leading ones; BERT's token types n leading zeros;
- the outputs of the virtual positions are dropped (`drop_virtual`), so heads and losses see
  the task's own sequence length. BERT's sequence classifier pools position 0, which is then
  the first virtual token, exactly as under PEFT.

The param `prompt_embeddings` [n, hidden] (logical axes `virtual_tokens`, `embed`) sits in
the scope of the module that embeds the tokens. At load (`initial_values`) it is set to the
pretrained embeddings of n random vocabulary tokens, PEFT's `prompt_tuning_init=
"SAMPLE_VOCAB"`; a model initialised from scratch draws it N(0, initializer_range).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

PROMPT_EMBEDDINGS = "prompt_embeddings"  # param leaf name
VIRTUAL_AXIS = "virtual_tokens"  # logical axis name of its first dim (replicated by default)


def virtual_tokens(adapter: Any) -> int:
    """How many virtual tokens a model config's adapter (its `lora` field) prepends."""
    return adapter.num_virtual_tokens if adapter is not None and adapter.method == "prompt" else 0


def embeddings(module: nn.Module, count: int, hidden: int, stddev: float, dtype: Any) -> jax.Array:
    """The `prompt_embeddings` param [count, hidden] of `module` (call it in its setup or
    compact `__call__`)."""
    init = nn.with_logical_partitioning(nn.initializers.normal(stddev), (VIRTUAL_AXIS, "embed"))
    return module.param(PROMPT_EMBEDDINGS, init, (count, hidden), dtype)


def prepend(prompt_ND: jax.Array, x_BTD: jax.Array) -> jax.Array:
    """[B, n + T, D]: the virtual tokens (the same for every row) before the embeddings."""
    batch = x_BTD.shape[0]
    prompt_BND = jnp.broadcast_to(prompt_ND.astype(x_BTD.dtype), (batch, *prompt_ND.shape))
    return jnp.concatenate([prompt_BND, x_BTD], axis=1)


def extend(values_BT: jax.Array | None, count: int, fill: int) -> jax.Array | None:
    """A per-token array [B, T] with `count` leading `fill`s (mask 1, token type 0)."""
    if values_BT is None or not count:
        return values_BT
    lead = jnp.full((values_BT.shape[0], count), fill, values_BT.dtype)
    return jnp.concatenate([lead, values_BT], axis=1)


def extend_positions(positions_BT: jax.Array, count: int) -> jax.Array:
    """Positions 0..count-1 for the virtual tokens, the real tokens' shifted by `count`."""
    batch = positions_BT.shape[0]
    lead = jnp.broadcast_to(jnp.arange(count, dtype=positions_BT.dtype), (batch, count))
    return jnp.concatenate([lead, positions_BT + count], axis=1)


def drop_virtual(x_BTD: jax.Array, count: int) -> jax.Array:
    """The outputs of the real tokens only."""
    return x_BTD[:, count:] if count else x_BTD


def decoder_inputs(prompt_ND, x_BTD, attention_mask, segment_ids, positions, cache, cache_index):
    """A decoder's inputs with the virtual tokens `prompt_ND` [n, D] prepended, and how many
    this call prepends: all n without a KV cache and in a prefill (`cache_index` the Python
    int 0: they fill cache slots 0..n-1, which the family's `init_cache` adds), none in a
    decode step, whose slot and positions are the caller's shifted by n.

    Returns (x, attention_mask, segment_ids, positions, cache_index, prepended).
    """
    n = prompt_ND.shape[0]
    attention_mask = extend(attention_mask, n, 1)
    if cache is not None and not (isinstance(cache_index, int) and cache_index == 0):
        return x_BTD, attention_mask, segment_ids, positions + n, cache_index + n, 0
    x_BTD = prepend(prompt_ND, x_BTD)
    positions = extend_positions(positions, n)
    return x_BTD, attention_mask, extend(segment_ids, n, 0), positions, cache_index, n


def encoder_inputs(module, config, words_BLD, token_type_ids_BL):
    """An encoder's word embeddings and token types with `config.lora`'s virtual tokens
    (the `prompt_embeddings` param of `module`) prepended, token type 0; the total length
    must fit the model's position embeddings."""
    n = virtual_tokens(config.lora)
    prompt_ND = embeddings(
        module, n, config.hidden_size, config.initializer_range, config.param_dtype
    )
    words_BLD = prepend(prompt_ND, words_BLD)
    if words_BLD.shape[1] > config.max_position_embeddings:
        raise ValueError(
            f"peft.num_virtual_tokens={n} virtual tokens + {words_BLD.shape[1] - n} tokens "
            f"exceed the model's max_position_embeddings={config.max_position_embeddings}: "
            "lower data.max_length or peft.num_virtual_tokens"
        )
    return words_BLD, extend(token_type_ids_BL, n, 0)


def initial_values(
    flat: dict[str, jax.Array], word_embeddings: str, seed: int, prompts: dict[str, Any]
) -> dict[str, jax.Array]:
    """{path: value} of the `prompts` leaves (path -> shape and dtype): the rows of the
    `word_embeddings` table in `flat` ('/'-joined params) for token ids drawn from `seed`
    (PEFT's SAMPLE_VOCAB)."""
    table = flat[word_embeddings]
    out = {}
    for path, leaf in prompts.items():
        ids = jax.random.randint(jax.random.PRNGKey(seed), leaf.shape[:1], 0, table.shape[0])
        out[path] = table[ids].astype(leaf.dtype)
    return out
