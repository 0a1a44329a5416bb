"""Jitted text generation for causal LMs with a KV cache and fixed shapes.

Prompts are left-padded to a bucketed length P, the cache holds P + max_new_tokens slots, and
one jitted program does the prefill and the shared decode loop (`decoding.py`): a program per
(batch size, bucket), never one per token or per call. Greedy at temperature 0, otherwise temperature +
top-k sampling from `jax.random`. A row that emits an EOS id keeps that token and emits
`pad_id` after it; the loop stops early once every row has.

    generator = Generator(module, eos_ids=(2,), pad_id=0, sampling=SamplingConfig(64))
    outputs = generator.generate(params, [[1, 5, 9], [1, 7]], batch_size=8)
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from finetune_jax.evaluation import decoding
from finetune_jax.models import llama


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are chosen: greedy at `temperature` 0, else softmax(logits / temperature)
    restricted to the `top_k` highest logits (0: no restriction). `seed` seeds the key."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0 or self.top_k < 0:
            raise ValueError(f"temperature and top_k must be >= 0: {self}")


def sample_tokens(logits_BV, key, temperature: float, top_k: int):
    """One token per row [B] int32 from float logits [B, V] (see SamplingConfig)."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits_BV = logits_BV.astype(jnp.float32) / temperature
    if top_k:
        kth_B1 = lax.top_k(logits_BV, top_k)[0][:, -1:]
        logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    return jax.random.categorical(key, logits_BV, axis=-1).astype(jnp.int32)


def _generate_tokens(
    module: llama.LlamaForCausalLM,
    eos_ids: tuple[int, ...],
    pad_id: int,
    sampling: SamplingConfig,
    params: Any,
    ids_BP: jax.Array,
    mask_BP: jax.Array,
    key: jax.Array,
) -> jax.Array:
    """Prefill left-padded prompts, then decode; new tokens [B, max_new_tokens] int32."""
    batch, prompt_len = ids_BP.shape
    steps = sampling.max_new_tokens
    apply = functools.partial(module.apply, {"params": params})
    sample = functools.partial(
        sample_tokens, temperature=sampling.temperature, top_k=sampling.top_k
    )
    # Generated slots are valid from the start: causality already hides the unwritten ones.
    mask_BS = jnp.concatenate([mask_BP, jnp.ones((batch, steps), mask_BP.dtype)], axis=1)
    positions_BP = jnp.maximum(jnp.cumsum(mask_BP, axis=1) - 1, 0)
    lengths_B = jnp.sum(mask_BP, axis=1)  # position of the first new token

    cache = llama.init_cache(module.config, batch, prompt_len + steps)
    logits_B1V, cache = apply(
        ids_BP, mask_BS, positions=positions_BP, cache=cache, cache_index=0, last_logits_only=True
    )

    def step(previous_B1, t, cache):
        # Feeds the token of generation step t - 1, at slot prompt_len + t - 1.
        logits_B1V, cache = apply(
            previous_B1,
            mask_BS,
            positions=(lengths_B + t - 1)[:, None],
            cache=cache,
            cache_index=prompt_len + t - 1,
        )
        return logits_B1V[:, -1], cache

    def choose(logits_BV, t):
        return sample(logits_BV, jax.random.fold_in(key, t))

    # Rows without a real token (batch filler) start finished.
    return decoding.greedy_search(
        step, logits_B1V[:, -1], cache, steps, choose, eos_ids, pad_id, lengths_B == 0
    )


class Generator:
    """Generates continuations of token-id prompts with `module` (a LlamaForCausalLM).

    Each batch is left-padded to the smallest of `prompt_buckets` that fits its longest
    prompt; a prompt longer than the largest bucket is a ValueError. Short batches get
    filler rows, so shapes (and compiled programs) depend only on batch size and bucket.
    Params may be any (sharded) arrays jit accepts; they are never copied to the host.
    """

    def __init__(
        self,
        module: llama.LlamaForCausalLM,
        eos_ids: Sequence[int],
        pad_id: int,
        sampling: SamplingConfig,
        prompt_buckets: Sequence[int] = (64, 128, 256, 512),
    ) -> None:
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.pad_id = int(pad_id)
        self.sampling = sampling
        self.prompt_buckets = tuple(sorted(prompt_buckets))
        self._generate = jax.jit(
            functools.partial(_generate_tokens, module, self.eos_ids, self.pad_id, sampling)
        )

    def bucket(self, length: int) -> int:
        """The padded prompt length for a longest prompt of `length` tokens."""
        index = bisect.bisect_left(self.prompt_buckets, length)
        if index == len(self.prompt_buckets):
            raise ValueError(
                f"A prompt of {length} tokens is longer than the largest prompt bucket "
                f"{self.prompt_buckets[-1]}; add a larger bucket or shorten the prompt."
            )
        return self.prompt_buckets[index]

    def generate_padded(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]],
        batch_size: int,
        seed: int | None = None,
    ) -> np.ndarray:
        """New tokens [len(prompts), max_new_tokens] int32: a row's EOS is kept, then pad.

        Batch i samples with `fold_in(PRNGKey(seed), i)`; `seed` defaults to the sampling
        config's (a different seed needs no recompile).
        """
        if any(len(p) == 0 for p in prompts):
            raise ValueError("Empty prompt: generation needs at least one prompt token")
        key = jax.random.PRNGKey(self.sampling.seed if seed is None else seed)
        outputs = []
        for index, start in enumerate(range(0, len(prompts), batch_size)):
            chunk = prompts[start : start + batch_size]
            length = self.bucket(max(len(p) for p in chunk))
            ids_BP = np.full((batch_size, length), self.pad_id, np.int32)
            mask_BP = np.zeros((batch_size, length), np.int32)
            for row, prompt in enumerate(chunk):
                ids_BP[row, length - len(prompt) :] = prompt
                mask_BP[row, length - len(prompt) :] = 1
            tokens_BN = self._generate(params, ids_BP, mask_BP, jax.random.fold_in(key, index))
            outputs.append(np.asarray(jax.device_get(tokens_BN))[: len(chunk)])
        if not outputs:
            return np.zeros((0, self.sampling.max_new_tokens), np.int32)
        return np.concatenate(outputs)

    def generate(
        self,
        params: Any,
        prompts: Sequence[Sequence[int]],
        batch_size: int,
        seed: int | None = None,
    ) -> list[list[int]]:
        """New tokens of each prompt, up to and including its first EOS id (if any)."""
        results = []
        for row in self.generate_padded(params, prompts, batch_size, seed).tolist():
            ends = [i for i, token in enumerate(row) if token in self.eos_ids]
            results.append(row[: ends[0] + 1] if ends else row)
        return results

    def compiled_shapes(self) -> int:
        """How many programs the generation function has compiled (one per batch/bucket)."""
        return self._generate._cache_size()
