"""Whisper contracts: parity with transformers (encoder output, decoder logits, a window
shorter than 30 s), cached decoding equal to the full pass, logical names, weight round trip
and errors, LoRA on every projection, the hidden-state / head split, remat and bf16."""

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

from finetune_jax import models
from finetune_jax.config import base_config
from finetune_jax.hf import model_files
from finetune_jax.models import hf_mapping, lora, whisper, whisper_config
from tests.conftest import TINY_WHISPER
from tests.helpers import greedy_decode, load_whisper

TINY = whisper_config.WhisperConfig(**TINY_WHISPER)
# One layer each: for the contracts that need no checkpoint, where compile time dominates.
ONE_LAYER = dataclasses.replace(TINY, encoder_layers=1, decoder_layers=1)


@functools.cache
def _init(config: whisper_config.WhisperConfig):
    return nn.meta.unbox(whisper.init_params(config, jax.random.PRNGKey(0)))


def _inputs(frames: int = 64, length: int = 10, seed: int = 0):
    """Random log-mel-like features [2, 8, frames], decoder ids [2, length] and a decoder
    mask whose second row is right-padded after 6 tokens."""
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(2, TINY.num_mel_bins, frames)).astype(np.float32)
    ids = rng.integers(4, TINY.vocab_size, (2, length)).astype(np.int32)
    ids[:, 0] = TINY.decoder_start_token_id
    mask = np.ones_like(ids)
    mask[1, 6:] = 0
    return features, ids, mask


def _hf_outputs(model, features, ids, mask):
    with torch.no_grad():
        out = model(
            input_features=torch.from_numpy(features),
            decoder_input_ids=torch.from_numpy(ids).long(),
            decoder_attention_mask=torch.from_numpy(mask).long(),
        )
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


@functools.cache
def _forward(config: whisper_config.WhisperConfig):
    module = whisper.WhisperForConditionalGeneration(config)

    @jax.jit
    def forward(params, features, ids, mask):
        memory = module.apply({"params": params}, features, method="encode")
        logits = module.apply({"params": params}, features, ids, mask)
        return memory, logits

    return forward


def _assert_parity(ours, expected, mask, what):
    memory, logits = ours
    encoder_diff = np.abs(np.asarray(memory) - expected[0]).max()
    keep = mask.astype(bool)
    logits_diff = np.abs(np.asarray(logits) - expected[1])[keep].max()
    print(f"{what}: max |encoder diff| {encoder_diff:.2e}, max |logit diff| {logits_diff:.2e}")
    assert encoder_diff < 1e-4 and logits_diff < 1e-4


def test_tiny_whisper_matches_transformers(tiny_whisper_dir):
    config, module, params = load_whisper(tiny_whisper_dir)
    assert isinstance(module, whisper.WhisperForConditionalGeneration)
    assert config == TINY
    features, ids, mask = _inputs()
    reference = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir)
    expected = _hf_outputs(reference.eval(), features, ids, mask)
    ours = _forward(config)(params, features, ids, mask)
    assert ours[0].shape == (2, 32, 32) and ours[1].shape == (2, 10, 96)
    assert ours[1].dtype == jnp.float32
    _assert_parity(ours, expected, mask, "tiny whisper")
    # The checkpoint's frozen position table (not read) holds the sinusoids we compute.
    stored = model_files.read_safetensors(tiny_whisper_dir)["model.encoder.embed_positions.weight"]
    np.testing.assert_allclose(stored, whisper.sinusoids(32, 32), atol=1e-5)


def test_shorter_window_uses_the_first_positions(tiny_whisper_dir):
    # transformers only runs its full window; a model whose window is 12 positions, with
    # the same weights, is what ours must compute on 24 frames with a 32-position window.
    full = transformers.WhisperForConditionalGeneration.from_pretrained(tiny_whisper_dir)
    short = transformers.WhisperForConditionalGeneration(
        transformers.WhisperConfig(**{**TINY_WHISPER, "max_source_positions": 12})
    )
    state = full.state_dict()
    state["model.encoder.embed_positions.weight"] = state["model.encoder.embed_positions.weight"][
        :12
    ]
    short.load_state_dict(state)
    features, ids, mask = _inputs(frames=24)
    expected = _hf_outputs(short.eval(), features, ids, mask)
    config, _, params = load_whisper(tiny_whisper_dir)
    ours = _forward(config)(params, features, ids, mask)
    assert ours[0].shape == (2, 12, 32)
    _assert_parity(ours, expected, mask, "tiny whisper, 12 of 32 positions")


def test_cached_decoding_equals_the_full_pass(tiny_whisper_dir):
    config, module, params = load_whisper(tiny_whisper_dir)
    features, ids, _ = _inputs()
    apply = functools.partial(module.apply, {"params": params})
    full = jax.jit(apply)(features, ids)
    memory = jax.jit(functools.partial(apply, method="encode"))(features)
    cache = jax.jit(functools.partial(apply, method="init_cache"), static_argnums=1)(memory, 16)
    assert jax.tree.map(jnp.shape, cache["cross"][0]) == {"k": (2, 32, 4, 8), "v": (2, 32, 4, 8)}
    decode = jax.jit(functools.partial(apply, method="decode"))
    # A 4-token prefill, then one token at a time (the positions follow cache_index).
    logits, cache = decode(ids[:, :4], cache=cache, cache_index=0)
    steps = [logits]
    for index in range(4, ids.shape[1]):
        logits, cache = decode(ids[:, index : index + 1], cache=cache, cache_index=index)
        steps.append(logits)
    cached = np.concatenate(steps, axis=1)
    diff = np.abs(cached - np.asarray(full)).max()
    print(f"cached vs full decoding: max |logit diff| {diff:.2e}")
    assert diff < 1e-5
    # The greedy helper (encode, init_cache, prefill, steps) agrees with argmax of the full pass.
    prompt = [TINY.decoder_start_token_id, 7]
    tokens = greedy_decode(module, params, features, prompt, 5, eos_id=-1)
    sequence = np.zeros((2, len(prompt) + 5), np.int32)
    sequence[:, : len(prompt)] = prompt
    for index in range(len(prompt), sequence.shape[1]):  # causal: later slots do not matter
        sequence[:, index] = np.argmax(jax.jit(apply)(features, sequence)[:, index - 1], -1)
    assert tokens == sequence[:, len(prompt) :].tolist()


def _flat_boxed(config):
    shapes = jax.eval_shape(functools.partial(whisper.init_params, config), jax.random.PRNGKey(0))
    return {
        "/".join(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )
    }


def test_param_paths_shapes_and_logical_names():
    flat = _flat_boxed(TINY)
    for name, leaf in flat.items():
        assert isinstance(leaf, nn.Partitioned), name
        assert len(leaf.names) == leaf.value.ndim, (name, leaf.names)
    expected = {
        "model/encoder/conv1/kernel": ((3, 8, 32), (None, None, "embed")),
        "model/encoder/conv2/kernel": ((3, 32, 32), (None, "embed", None)),
        "model/encoder/layers_1/self_attn/q_proj/kernel": ((32, 4, 8), ("embed", "heads", "kv")),
        "model/encoder/layers_1/self_attn/out_proj/kernel": ((4, 8, 32), ("heads", "kv", "embed")),
        "model/encoder/layers_0/fc1/kernel": ((32, 48), ("embed", "mlp")),
        "model/encoder/layer_norm/scale": ((32,), ("embed",)),
        "model/decoder/embed_tokens/embedding": ((96, 32), ("vocab", "embed")),
        "model/decoder/embed_positions/embedding": ((40, 32), ("position", "embed")),
        "model/decoder/layers_0/encoder_attn/v_proj/bias": ((4, 8), ("heads", "kv")),
        "model/decoder/layers_0/fc2/kernel": ((48, 32), ("mlp", "embed")),
    }
    for path, (shape, names) in expected.items():
        assert (flat[path].value.shape, tuple(flat[path].names)) == (shape, names), path
    known = {name for name, _ in base_config().sharding.rules}  # the default rules table
    assert {n for leaf in flat.values() for n in leaf.names if n is not None} <= known
    # No k bias anywhere, no position table in the encoder, no separate output head.
    assert not [p for p in flat if "k_proj/bias" in p or "encoder/embed_positions" in p]
    assert {m.path for m in whisper.FAMILY.hf_param_mappings(TINY)} == set(flat)


def test_to_hf_from_hf_round_trip_and_errors(tiny_whisper_dir):
    hf = model_files.read_safetensors(tiny_whisper_dir)
    family = whisper.FAMILY
    params, missing = hf_mapping.params_from_hf(hf, family, TINY)
    assert missing == []
    back = hf_mapping.params_to_hf(params, family, TINY)
    # Every tensor comes back (proj_out is tied: transformers saves none); the sinusoid
    # table is ours, within float32 rounding of torch's.
    assert set(back) == set(hf)
    for key, value in back.items():
        atol = 1e-5 if key == "model.encoder.embed_positions.weight" else 0
        np.testing.assert_allclose(value, hf[key], atol=atol, rtol=0, err_msg=key)
    key = "model.decoder.layers.1.encoder_attn.k_proj.weight"
    with pytest.raises(ValueError) as error:
        hf_mapping.params_from_hf({**hf, key: np.zeros((32, 5), np.float32)}, family, TINY)
    for part in (key, "model/decoder/layers_1/encoder_attn/k_proj/kernel", "(32, 5)"):
        assert part in str(error.value)
    extra = "model.encoder.layers.0.self_attn.k_proj.bias"
    with pytest.raises(ValueError, match=f"no place.*{extra}"):
        hf_mapping.params_from_hf({**hf, extra: np.zeros((32,), np.float32)}, family, TINY)


def test_exported_tensors_load_in_transformers(tiny_whisper_dir, tmp_path):
    # What export writes (params_to_hf + config.json) is a complete HF directory.
    config, _, params = load_whisper(tiny_whisper_dir)
    tensors = hf_mapping.params_to_hf(params, whisper.FAMILY, config)
    hf_config = model_files.read_hf_config(tiny_whisper_dir)
    model_files.write_safetensors(tensors, tmp_path, hf_config)
    reloaded, info = transformers.WhisperForConditionalGeneration.from_pretrained(
        tmp_path, output_loading_info=True
    )
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    features, ids, mask = _inputs()
    expected = _hf_outputs(reloaded.eval(), features, ids, mask)
    _assert_parity(_forward(config)(params, features, ids, mask), expected, mask, "exported")


def test_config_from_hf_registry_and_errors(tiny_whisper_dir):
    hf_config = model_files.read_hf_config(tiny_whisper_dir)
    config = whisper_config.WhisperConfig.from_hf(hf_config, remat="full", dtype="bfloat16")
    assert (config.d_model, config.remat, config.dtype) == (32, "full", "bfloat16")
    hash(config)  # a jit static argument
    assert models.family_for("whisper") is whisper.FAMILY
    with pytest.raises(ValueError, match="scan_layers"):
        whisper_config.WhisperConfig.from_hf(hf_config, scan_layers=True)
    with pytest.raises(ValueError, match="tied"):
        whisper_config.WhisperConfig.from_hf({**hf_config, "tie_word_embeddings": False})
    with pytest.raises(ValueError, match="classification"):
        whisper.FAMILY.module_for(TINY, "classification")
    module = whisper.WhisperForConditionalGeneration(ONE_LAYER)
    params = _init(ONE_LAYER)
    features, ids, _ = _inputs(frames=66)
    shapes = functools.partial(jax.eval_shape, module.apply, {"params": params})  # no compute
    with pytest.raises(ValueError, match="at most 64 frames"):
        shapes(features, ids)
    with pytest.raises(ValueError, match="max_target_positions=40"):
        shapes(features[..., :8], np.zeros((2, 41), np.int32))
    with pytest.raises(ValueError, match="not both"):
        jax.eval_shape(functools.partial(module.apply, method="decode"), {"params": params}, ids)


def test_lora_on_every_projection_starts_as_the_base_model():
    targets = r".*/(q_proj|k_proj|v_proj|out_proj|fc1|fc2)/kernel"
    config = dataclasses.replace(ONE_LAYER, lora=lora.LoraConfig(rank=2, targets=targets))
    base, params = _init(ONE_LAYER), _init(config)
    adapted = lora.adapter_paths(lora.flat_paths(params))
    # Per layer: 4 projections per attention block (1 encoder, 2 decoder) + fc1 + fc2.
    per_layer = 2 * (4 + 2) * config.encoder_layers + 2 * (8 + 2) * config.decoder_layers
    assert len(adapted) == per_layer
    names = _flat_boxed(config)["model/decoder/layers_0/self_attn/q_proj/lora_a"].names
    assert tuple(names) == ("embed", "lora_rank")
    features, ids, mask = _inputs()
    base_logits = jax.jit(whisper.WhisperForConditionalGeneration(ONE_LAYER).apply)(
        {"params": base}, features, ids
    )
    logits = jax.jit(whisper.WhisperForConditionalGeneration(config).apply)(
        {"params": params}, features, ids
    )
    np.testing.assert_allclose(logits, base_logits, atol=1e-6)  # B starts at zero


def test_hidden_state_through_logits_from_hidden_equals_logits():
    module = whisper.WhisperForConditionalGeneration(ONE_LAYER)
    params = _init(ONE_LAYER)
    features, ids, mask = _inputs()
    apply = jax.jit(module.apply, static_argnames=("return_hidden", "method"))
    logits = apply({"params": params}, features, ids, mask)
    hidden = apply({"params": params}, features, ids, mask, return_hidden=True)
    assert hidden.shape == (2, 10, ONE_LAYER.d_model)
    head = apply({"params": params}, hidden[:, 2:5], method="logits_from_hidden")
    np.testing.assert_allclose(head, logits[:, 2:5], rtol=1e-6, atol=1e-6)


def test_remat_bfloat16_and_dropout_variants():
    params = _init(ONE_LAYER)
    features, ids, mask = _inputs()
    base = jax.jit(whisper.WhisperForConditionalGeneration(ONE_LAYER).apply)(
        {"params": params}, features, ids, mask
    )
    variants = (({"remat": "full"}, 1e-6), ({"dtype": "bfloat16"}, 5e-2))
    for overrides, atol in variants:
        module = whisper.WhisperForConditionalGeneration(
            dataclasses.replace(ONE_LAYER, **overrides)
        )

        def loss(p, module=module):
            logits = module.apply({"params": p}, features, ids, mask)
            return logits.sum(), logits

        (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        assert logits.dtype == jnp.float32, overrides
        np.testing.assert_allclose(logits, base, atol=atol, err_msg=str(overrides))
        assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
    rates = dict(dropout=0.1, attention_dropout=0.1, activation_dropout=0.1)
    module = whisper.WhisperForConditionalGeneration(dataclasses.replace(ONE_LAYER, **rates))
    apply = jax.jit(module.apply, static_argnames="deterministic")
    np.testing.assert_allclose(apply({"params": params}, features, ids, mask), base, atol=1e-6)
    dropped = [
        apply(
            {"params": params},
            features,
            ids,
            mask,
            deterministic=False,
            rngs={"dropout": jax.random.PRNGKey(seed)},
        )
        for seed in (0, 1)
    ]
    assert np.abs(dropped[0] - base).max() > 1e-3 and np.abs(dropped[0] - dropped[1]).max() > 1e-3
