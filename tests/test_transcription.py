"""Cached greedy transcription equals uncached greedy decoding (the full decoder re-run over
the growing sequence), with suppressed tokens, one program per shape; beam search gives
transformers' `generate(num_beams=k)` tokens, length penalty included."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax.evaluation.transcription import Transcriber
from tests.conftest import TINY_WHISPER
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


@pytest.fixture(scope="module")
def peaked_whisper(tmp_path_factory):
    """(torch model, our module, params): the tiny random Whisper with larger weights
    (init_std 0.3) and a 3x EOS embedding. The default tiny model repeats one token and never
    stops, so beams would equal greedy and no length penalty would act; this one varies its
    tokens and ends rows at different lengths."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.WhisperConfig(**{**TINY_WHISPER, "init_std": 0.3})
    model = transformers.WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.model.decoder.embed_tokens.weight[config.eos_token_id] *= 3.0
    out_dir = tmp_path_factory.mktemp("peaked_whisper")
    model.save_pretrained(out_dir, safe_serialization=True)
    _, module, params = load_whisper(out_dir)
    return model, module, params


def _until_eos(row, eos):
    """Token ids before the first EOS (trailing pad id 0 dropped: transformers' filler)."""
    row = list(row)
    row = row[: row.index(eos)] if eos in row else row
    while row and row[-1] == 0:
        row.pop()
    return row


def test_beam_search_equals_transformers_generate(peaked_whisper):
    import torch

    model, module, params = peaked_whisper
    features = np.asarray(jax.random.normal(jax.random.key(1), (6, 8, 64)), np.float32)
    start = model.generation_config.decoder_start_token_id
    generation = {**GENERATION, "decoder_start_token_id": start}

    def hf_generate(num_beams, length_penalty=1.0):
        with torch.no_grad():
            out = model.generate(
                torch.tensor(features),
                num_beams=num_beams,
                length_penalty=length_penalty,
                max_new_tokens=12,
                do_sample=False,
                suppress_tokens=GENERATION["suppress_tokens"],
                begin_suppress_tokens=GENERATION["begin_suppress_tokens"],
            )
        return [_until_eos(row, 2) for row in out.tolist()]

    results = {}
    for length_penalty in (1.0, 0.3):
        generation["length_penalty"] = length_penalty
        transcriber = Transcriber(module, generation, None, max_new_tokens=12, num_beams=3)
        ours = [_until_eos(row, 2) for row in transcriber.tokens(params, features).tolist()]
        assert ours == hf_generate(3, length_penalty), length_penalty
        results[length_penalty] = ours
    # Each case exercises something: beams differ from greedy, the penalty matters, and some
    # rows end early while others run out of tokens.
    assert results[1.0] != hf_generate(1) and results[0.3] != results[1.0]
    lengths = {len(row) for rows in results.values() for row in rows}
    assert min(lengths) < 12 - 1 and max(lengths) == 12


def test_num_beams_must_be_positive(tiny_whisper_dir):
    _, module, _ = load_whisper(tiny_whisper_dir)
    with pytest.raises(ValueError, match="generate.num_beams=0"):
        Transcriber(module, GENERATION, tokenizer=None, max_new_tokens=4, num_beams=0)
