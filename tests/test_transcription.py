"""Cached greedy transcription equals uncached greedy decoding (the full decoder re-run over
the growing sequence), with suppressed tokens, one program per shape."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.evaluation.transcription import Transcriber
from tests.helpers import greedy_decode, load_whisper

GENERATION = {
    "decoder_start_token_id": 3,
    "eos_token_id": 2,
    "suppress_tokens": [5, 7, 11],
    "begin_suppress_tokens": [13, 2],
}


def _uncached_greedy(module, params, features, prompt, steps, banned, banned_first, eos):
    """Greedy by re-running the whole teacher-forcing forward on the growing sequence
    (kept at one length: causal attention hides the unfilled tail from position t)."""
    batch, length = features.shape[0], len(prompt) + steps
    ids = np.zeros((batch, length), np.int32)
    ids[:, : len(prompt)] = prompt
    forward = jax.jit(lambda p, f, i: module.apply({"params": p}, f, i))
    out, done = [], np.zeros(batch, bool)
    for step in range(steps):
        position = len(prompt) + step - 1
        scores = np.array(forward(params, features, jnp.asarray(ids))[:, position])
        scores[:, banned] = -np.inf
        if step == 0:
            scores[:, banned_first] = -np.inf
        token = np.where(done, eos, scores.argmax(-1))
        done |= token == eos
        out.append(token)
        ids[:, position + 1] = token
    return np.stack(out, axis=1)


def test_cached_generation_equals_uncached_greedy(tiny_whisper_dir):
    config, module, params = load_whisper(tiny_whisper_dir)
    features = jax.random.normal(jax.random.key(1), (3, config.num_mel_bins, 64))
    transcriber = Transcriber(module, GENERATION, tokenizer=None, max_new_tokens=12)
    tokens = transcriber.tokens(params, features)
    assert tokens.shape == (3, 12) and tokens.dtype == np.int32
    expected = _uncached_greedy(module, params, features, (3,), 12, [5, 7, 11], [13, 2], 2)
    np.testing.assert_array_equal(tokens, expected)
    assert not np.isin(tokens, [5, 7, 11]).any() and not np.isin(tokens[:, 0], [13, 2]).any()
    # The same as the tests' step-by-step reference (helpers.greedy_decode), row by row.
    rows = greedy_decode(module, params, features, [3], 12, 2, [5, 7, 11], [13, 2])
    for row, reference in zip(tokens.tolist(), rows):
        assert row[: len(reference)] == reference
    # A shorter clip window is another shape: a second program, and only that.
    transcriber.tokens(params, features[:, :, :32])
    transcriber.tokens(params, features[:, :, :32] + 1)
    assert transcriber.compiled_shapes() == 2


def test_max_new_tokens_fits_the_decoder_positions(tiny_whisper_dir):
    config, module, _ = load_whisper(tiny_whisper_dir)
    with_timestamps = {**GENERATION, "no_timestamps_token_id": 4}
    transcriber = Transcriber(module, with_timestamps, tokenizer=None, max_new_tokens=1000)
    assert transcriber.prompt == (3, 4)
    assert transcriber.max_new_tokens == config.max_target_positions - 2
