"""Generation contracts: cached logits equal a full forward, greedy equals a naive recompute
loop and transformers' generate, one compiled program per bucket, sampling semantics, EOS."""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from finetune_jax.evaluation.lm_generation import Generator, SamplingConfig
from finetune_jax.models import llama, llama_config
from tests import test_llama
from tests.helpers import load_llama

# TINY of test_llama with a wider init, so next-token logits are far from ties.
TINY = dataclasses.replace(test_llama.TINY, initializer_range=0.1)
# Mistral-style: GQA, a 3-token window on layer 0, full attention on layer 1, remat on.
SLIDING = dataclasses.replace(
    TINY,
    model_type="mistral",
    sliding_window=3,
    layer_types=(llama_config.SLIDING, "full_attention"),
    remat="full",
)
PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [4, 8, 15, 16, 23, 42, 1]]
PAD = 0


@functools.cache
def _params(config: llama.LlamaConfig):
    return nn.unbox(llama.init_params(config, jax.random.PRNGKey(0)))


@functools.cache
def _full_logits(config: llama.LlamaConfig):
    """Jitted plain forward (no cache): [B, T] ids -> [B, T, V] logits."""
    module = llama.LlamaForCausalLM(config)
    return jax.jit(
        lambda params, ids, mask, positions: module.apply(
            {"params": params}, ids, mask, positions=positions
        )
    )


def _naive_greedy(config, params, prompt: list[int], steps: int) -> list[int]:
    """Recomputes the whole forward for every new token and takes the argmax.

    The sequence sits right-padded in a fixed buffer (one compile); causality keeps the
    padding after the current token out of its logits.
    """
    forward = _full_logits(config)
    buffer = np.zeros((1, 32), np.int32)
    buffer[0, : len(prompt)] = prompt
    positions = np.arange(32)[None]
    ones = np.ones_like(buffer)
    length = len(prompt)
    for _ in range(steps):
        logits = forward(params, buffer, ones, positions)
        buffer[0, length] = int(jnp.argmax(logits[0, length - 1]))
        length += 1
    return buffer[0, len(prompt) : length].tolist()


def _left_padded(prompts, length):
    ids = np.full((len(prompts), length), PAD, np.int32)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt) :] = prompt
        mask[row, length - len(prompt) :] = 1
    return ids, mask


@pytest.mark.parametrize("config", [TINY, SLIDING], ids=["gqa", "gqa_sliding_window"])
def test_cached_logits_match_full_forward(config):
    """Prefill + single-token steps through the cache == one forward over the whole
    sequence, on left-padded rows (positions restart at each row's first real token)."""
    length, prefill = 12, 7
    rng = np.random.default_rng(0)
    rows = [rng.integers(1, 64, n).tolist() for n in (12, 9, 4)]
    ids, mask = _left_padded(rows, length)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    params, module = _params(config), llama.LlamaForCausalLM(config)
    expected = _full_logits(config)(params, ids, mask, positions)

    @jax.jit
    def step(cache, ids, positions, index):
        return module.apply(
            {"params": params}, ids, mask, positions=positions, cache=cache, cache_index=index
        )

    cache = llama.init_cache(config, len(rows), length)
    chunks = [step(cache, ids[:, :prefill], positions[:, :prefill], 0)]
    cache = chunks[0][1]
    for t in range(prefill, length):
        chunks.append(step(cache, ids[:, t : t + 1], positions[:, t : t + 1], t))
        cache = chunks[-1][1]
    cached = np.concatenate([logits for logits, _ in chunks], axis=1)
    keep = mask.astype(bool)
    diff = np.abs(cached - np.asarray(expected))[keep].max()
    print(f"{config.model_type}: max |cached - full logit| over real tokens {diff:.2e}")
    assert cached.shape == expected.shape and diff < 1e-5
    assert cache[0]["k"].shape == (3, length, config.num_key_value_heads, config.head_dim)
    # The prefill's last-position-only logits are the full prefill's last column.
    last, _ = module.apply(
        {"params": params},
        ids[:, :prefill],
        mask,
        positions=positions[:, :prefill],
        cache=llama.init_cache(config, len(rows), length),
        cache_index=0,
        last_logits_only=True,
    )
    np.testing.assert_allclose(last[:, 0], chunks[0][0][:, -1], atol=1e-6)


@pytest.mark.parametrize("config", [TINY, SLIDING], ids=["gqa", "gqa_sliding_window"])
def test_greedy_matches_naive_recompute(config):
    """Batched, left-padded, cached greedy == per-prompt full recompute + argmax; three
    prompts at batch size 2 also exercise a batch completed with a filler row."""
    params, steps = _params(config), 10
    generator = Generator(
        llama.LlamaForCausalLM(config), (), PAD, SamplingConfig(steps), prompt_buckets=(8, 16)
    )
    outputs = generator.generate(params, PROMPTS, batch_size=2)
    expected = [_naive_greedy(config, params, prompt, steps) for prompt in PROMPTS]
    assert outputs == expected
    assert len({tuple(o) for o in outputs}) == len(PROMPTS)  # not one degenerate answer


def test_greedy_matches_transformers_generate(tiny_llama_dir):
    """20 greedy tokens from the tiny HF Llama: ours (batched, left-padded) == HF's."""
    config, module, params = load_llama(tiny_llama_dir)
    prompts = [[1, 45, 200, 17, 99, 3], [1, 250, 7]]
    generator = Generator(module, (), PAD, SamplingConfig(20), prompt_buckets=(16,))
    ours = generator.generate(params, prompts, batch_size=2)
    reference = transformers.LlamaForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32
    ).eval()
    reference.generation_config.eos_token_id = None  # pure greedy: never stop early
    for prompt, tokens in zip(prompts, ours):
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]), do_sample=False, max_new_tokens=20, pad_token_id=PAD
            )
        expected = out[0, len(prompt) :].tolist()
        assert len(expected) == 20 and tokens == expected


def test_one_program_per_bucket_not_per_call_or_token():
    params = _params(TINY)
    generator = Generator(
        llama.LlamaForCausalLM(TINY), (), PAD, SamplingConfig(6, 1.0, 5), prompt_buckets=(8, 16)
    )
    first = generator.generate(params, PROMPTS[:2], batch_size=2)
    second = generator.generate(params, [[3, 1, 4], [1, 5, 9, 2, 6, 5]], batch_size=2, seed=7)
    assert generator.compiled_shapes() == 1
    assert first != second  # both calls really ran, on different inputs
    generator.generate(params, [list(range(1, 12))], batch_size=2)  # bucket 16
    assert generator.compiled_shapes() == 2


def test_top_k_one_at_temperature_one_equals_greedy():
    params, module = _params(TINY), llama.LlamaForCausalLM(TINY)
    greedy = Generator(module, (), PAD, SamplingConfig(10), prompt_buckets=(8,))
    top1 = Generator(module, (), PAD, SamplingConfig(10, 1.0, 1, seed=3), prompt_buckets=(8,))
    assert top1.generate(params, PROMPTS, 4) == greedy.generate(params, PROMPTS, 4)


def test_sampling_reproducible_seed_dependent_and_within_top_k():
    params, k, steps = _params(TINY), 3, 12
    sampling = SamplingConfig(steps, temperature=2.0, top_k=k, seed=0)
    generator = Generator(llama.LlamaForCausalLM(TINY), (), PAD, sampling, prompt_buckets=(8,))
    outputs = generator.generate(params, PROMPTS, 4)
    assert generator.generate(params, PROMPTS, 4) == outputs
    assert generator.generate(params, PROMPTS, 4, seed=1) != outputs
    # Each sampled token is among the k highest logits of a full forward at its step.
    forward = _full_logits(TINY)
    ranks = []
    for prompt, tokens in zip(PROMPTS, outputs):
        sequence = np.asarray([prompt + tokens], np.int32)
        logits = np.asarray(
            forward(params, sequence, np.ones_like(sequence), np.arange(sequence.shape[1])[None])
        )[0]
        for i, token in enumerate(tokens):
            step_logits = logits[len(prompt) + i - 1]
            ranks.append(int(np.sum(step_logits > step_logits[token] + 1e-5)))
    assert max(ranks) < k
    assert min(ranks) == 0 and max(ranks) > 0  # really sampled, not just greedy


def test_eos_stops_rows_and_pads_after():
    params, module, steps = _params(TINY), llama.LlamaForCausalLM(TINY), 10
    greedy = Generator(module, (), PAD, SamplingConfig(steps), prompt_buckets=(8,))
    baseline = greedy.generate(params, PROMPTS, 4)
    for eos_ids in [(baseline[0][3],), tuple(row[1] for row in baseline)]:
        generator = Generator(module, eos_ids, PAD, SamplingConfig(steps), prompt_buckets=(8,))
        padded = generator.generate_padded(params, PROMPTS, 4)
        expected_lists, expected_padded = [], []
        for row in baseline:
            stop = min([i for i, t in enumerate(row) if t in eos_ids], default=steps - 1)
            expected_lists.append(row[: stop + 1])  # the EOS token is kept
            expected_padded.append(row[: stop + 1] + [PAD] * (steps - stop - 1))
        assert padded.tolist() == expected_padded
        assert generator.generate(params, PROMPTS, 4) == expected_lists
        assert len(expected_lists[0]) <= 4 < steps  # row 0 did stop early
    # With one EOS per row every row stops within two tokens (the loop's early exit).
    assert all(len(row) <= 2 for row in expected_lists)


def test_prompt_errors_and_bfloat16_cache():
    config = dataclasses.replace(TINY, dtype="bfloat16")
    generator = Generator(
        llama.LlamaForCausalLM(config), (), PAD, SamplingConfig(3), prompt_buckets=(8,)
    )
    with pytest.raises(ValueError, match="longer than the largest prompt bucket 8"):
        generator.generate(_params(TINY), [list(range(1, 10))], 2)
    with pytest.raises(ValueError, match="Empty prompt"):
        generator.generate(_params(TINY), [[]], 2)
    assert llama.init_cache(config, 2, 5)[0]["v"].dtype == jnp.bfloat16
    outputs = generator.generate(_params(TINY), PROMPTS, 2)
    assert [len(o) for o in outputs] == [3, 3, 3]
    assert all(0 <= t < TINY.vocab_size for o in outputs for t in o)
