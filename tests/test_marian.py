"""Marian contracts: parity with transformers' MarianMTModel (teacher-forced logits, unrolled
and scanned; greedy decoding with our cache against `generate`), the exported tensors loading
back into transformers, logical names and HF rows of every param (attention and SSRU
decoders), the SSRU cell against its recurrence written out step by step, cached decoding
equal to the full pass, LoRA, and config errors."""

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
from finetune_jax.hf import loading, model_files
from finetune_jax.models import hf_mapping, lora, marian, marian_blocks, marian_config
from tests.conftest import TINY_MARIAN

TINY = marian_config.MarianConfig.from_hf({**TINY_MARIAN, "model_type": "marian"})
# The SSRU decoder of the Bergamot models, with Marian's positions and start embedding.
TINY_SSRU = dataclasses.replace(
    TINY,
    vocab_size=64,
    decoder_cell="ssru",
    sinusoid_layout="marian",
    start_embedding="zeros",
    layer_norm_eps=1e-9,
)


def load(model_dir, **overrides):
    return loading.load_pretrained(marian.FAMILY, str(model_dir), "translation", **overrides)


def _inputs(seed: int = 0):
    """Source ids [2, 9] (the second row padded after 6 tokens), decoder ids [2, 7] starting
    with the start token (the second row padded after 5)."""
    rng = np.random.default_rng(seed)
    src = rng.integers(2, 500, (2, 9)).astype(np.int32)
    src[:, -1], src[1, 5] = 0, 0  # each ends with </s>
    src_mask = np.ones_like(src)
    src_mask[1, 6:] = 0
    tgt = rng.integers(2, 500, (2, 7)).astype(np.int32)
    tgt[:, 0] = TINY.decoder_start_token_id
    tgt_mask = np.ones_like(tgt)
    tgt_mask[1, 5:] = 0
    return src, src_mask, tgt, tgt_mask


def _torch_logits(model, src, src_mask, tgt, tgt_mask):
    with torch.no_grad():
        return model(
            input_ids=torch.from_numpy(src).long(),
            attention_mask=torch.from_numpy(src_mask).long(),
            decoder_input_ids=torch.from_numpy(tgt).long(),
            decoder_attention_mask=torch.from_numpy(tgt_mask).long(),
        ).logits.numpy()


@functools.cache
def _reference(model_dir):
    return transformers.MarianMTModel.from_pretrained(model_dir).eval()


def _assert_logits(ours, expected, tgt_mask, what):
    diff = np.abs(np.asarray(ours) - expected)[tgt_mask.astype(bool)].max()
    print(f"{what}: max |logit diff| {diff:.2e}")
    assert diff < 1e-4, what


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_tiny_marian_matches_transformers(tiny_marian_dir, scan_layers):
    config, module, params = load(tiny_marian_dir, scan_layers=scan_layers)
    assert isinstance(module, marian.MarianMTModel)
    assert config == dataclasses.replace(TINY, scan_layers=scan_layers)
    src, src_mask, tgt, tgt_mask = _inputs()
    expected = _torch_logits(_reference(tiny_marian_dir), src, src_mask, tgt, tgt_mask)
    logits = jax.jit(module.apply)({"params": params}, src, src_mask, tgt, tgt_mask)
    assert logits.shape == (2, 7, 32000) and logits.dtype == jnp.float32
    _assert_logits(
        logits, expected, tgt_mask, f"tiny marian ({'scanned' if scan_layers else 'unrolled'})"
    )


def _greedy(module, params, src, src_mask, steps):
    """Greedy ids through encode, init_cache and one cached decode per token (the memory
    mask passed on every call), each row stopping at (and keeping) EOS."""
    apply = lambda method, *args, **kwargs: module.apply(  # noqa: E731
        {"params": params}, *args, method=method, **kwargs
    )
    memory = jax.jit(functools.partial(apply, "encode"))(src, src_mask)
    cache = jax.jit(functools.partial(apply, "init_cache"), static_argnums=1)(memory, steps + 1)
    step = jax.jit(functools.partial(apply, "decode", last_logits_only=True))
    token = np.full((src.shape[0], 1), TINY.decoder_start_token_id, np.int32)
    out, done = [], np.zeros(src.shape[0], bool)
    for index in range(steps):
        logits, cache = step(token, memory_mask=src_mask, cache=cache, cache_index=index)
        token = np.where(done, TINY.eos_token_id, np.argmax(logits[:, -1], -1))[:, None]
        out.append(token[:, 0])
        done |= token[:, 0] == TINY.eos_token_id
    return np.stack(out, axis=1)


def test_greedy_cached_decoding_equals_transformers_generate(tiny_marian_dir):
    _, module, params = load(tiny_marian_dir)
    src, src_mask, _, _ = _inputs(seed=1)
    with torch.no_grad():
        generated = _reference(tiny_marian_dir).generate(
            input_ids=torch.from_numpy(src).long(),
            attention_mask=torch.from_numpy(src_mask).long(),
            num_beams=1,
            do_sample=False,
            max_new_tokens=12,
            min_new_tokens=0,
        )
    expected = generated.numpy()[:, 1:]  # drop the start token
    ours = _greedy(module, params, src, src_mask, expected.shape[1])
    np.testing.assert_array_equal(ours, expected)


def test_exported_tensors_load_in_transformers(tiny_marian_dir, tmp_path):
    config, module, params = load(tiny_marian_dir)
    hf = model_files.read_safetensors(tiny_marian_dir)
    tensors = hf_mapping.params_to_hf(params, marian.FAMILY, config)
    assert set(tensors) == set(hf)  # model.shared, the layers and final_logits_bias
    for key, value in tensors.items():
        np.testing.assert_array_equal(value, hf[key], err_msg=key)
    model_files.write_safetensors(tensors, tmp_path, model_files.read_hf_config(tiny_marian_dir))
    reloaded, info = transformers.MarianMTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    src, src_mask, tgt, tgt_mask = _inputs()
    expected = _torch_logits(reloaded.eval(), src, src_mask, tgt, tgt_mask)
    logits = jax.jit(module.apply)({"params": params}, src, src_mask, tgt, tgt_mask)
    _assert_logits(logits, expected, tgt_mask, "exported")


def _flat_boxed(config):
    shapes = jax.eval_shape(functools.partial(marian.init_params, config), jax.random.PRNGKey(0))
    return {
        "/".join(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )
    }


@pytest.mark.parametrize("config", [TINY, TINY_SSRU], ids=["attention", "ssru"])
@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_param_paths_logical_names_and_hf_rows(config, scan_layers):
    config = dataclasses.replace(config, scan_layers=scan_layers)
    flat = _flat_boxed(config)
    known = {name for name, _ in base_config().sharding.rules}  # the default rules table
    for name, leaf in flat.items():
        assert isinstance(leaf, nn.Partitioned), name
        assert len(leaf.names) == leaf.value.ndim, (name, leaf.names)
        assert set(leaf.names) - {None} <= known, (name, leaf.names)
    rows = marian.FAMILY.with_head("translation").hf_param_mappings(config)
    assert {m.path for m in rows} == set(flat)
    for m in rows:  # a stacked row's shape is one layer's
        assert flat[m.path].value.shape[-len(m.shape) :] == m.shape, m.path
    layer = "model/decoder/layers/" if scan_layers else "model/decoder/layers_1/"
    if config.decoder_cell == "ssru":
        expected = {
            "ssru/x_proj/kernel": ("embed", "mlp"),
            "ssru/forget_proj/bias": ("mlp",),
            "ssru_layer_norm/scale": ("embed",),
        }
        assert not [p for p in flat if "decoder" in p and "/self_attn/" in p]
    else:
        expected = {"self_attn/k_proj/bias": ("heads", "kv")}
    for path, names in expected.items():
        leaf = flat[layer + path]
        assert tuple(leaf.names) == (("layers",) if scan_layers else ()) + names, path
    assert tuple(flat["final_logits_bias"].names) == ("vocab",)
    assert tuple(flat["model/shared/embedding"].names) == ("vocab", "embed")
    assert not [p for p in flat if "embed_tokens" in p or "embed_positions" in p]


def test_positions_tables():
    # transformers' table, as its embedding module builds it.
    expected = transformers.models.marian.modeling_marian.MarianSinusoidalPositionalEmbedding(
        20, 8
    ).create_weight()
    np.testing.assert_allclose(marian_blocks.positions_table(20, 8, "hf"), expected, atol=1e-7)
    # Marian's (`inits::sinusoidalPositionEmbeddings`): log(10000) / (D/2 - 1) per channel.
    position, channel = 7, 3
    frequency = np.exp(-channel * np.log(10000.0) / (8 / 2 - 1))
    table = marian_blocks.positions_table(20, 8, "marian")
    np.testing.assert_allclose(table[position, channel], np.sin(position * frequency), rtol=1e-5)
    np.testing.assert_allclose(
        table[position, 4 + channel], np.cos(position * frequency), rtol=1e-5
    )


def test_ssru_follows_its_recurrence_step_by_step():
    cell = marian_blocks.SSRU(TINY_SSRU)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 6, 32)).astype(np.float32)
    state = rng.normal(size=(2, 32)).astype(np.float32)
    params = cell.init(jax.random.PRNGKey(1), x)["params"]
    params = jax.tree.map(np.asarray, nn.meta.unbox(params))
    params["forget_proj"]["bias"] = rng.normal(size=32).astype(np.float32)
    w, wf, bf = (
        params["x_proj"]["kernel"],
        params["forget_proj"]["kernel"],
        params["forget_proj"]["bias"],
    )
    for start in (None, state):
        c = np.zeros((2, 32), np.float32) if start is None else start
        outputs = []
        for t in range(6):  # f_t = sigmoid(x Wf + bf); c_t = f c_{t-1} + (1 - f) x W; relu
            forget = 1 / (1 + np.exp(-(x[:, t] @ wf + bf)))
            c = forget * c + (1 - forget) * (x[:, t] @ w)
            outputs.append(np.maximum(c, 0))
        out, last = jax.jit(cell.apply)({"params": params}, x, True, start)
        np.testing.assert_allclose(out, np.stack(outputs, axis=1), atol=1e-5)
        np.testing.assert_allclose(last, c, atol=1e-5)


@functools.cache
def tiny_ssru_params():
    return nn.meta.unbox(marian.init_params(TINY_SSRU, jax.random.PRNGKey(0)))


def test_ssru_cached_decoding_equals_the_full_pass_and_the_scan():
    module, params = marian.MarianMTModel(TINY_SSRU), tiny_ssru_params()
    src, src_mask, tgt, _ = _inputs()
    src, tgt = src % 64, tgt % 64
    apply = functools.partial(module.apply, {"params": params})
    forward = jax.jit(apply)
    full = forward(src, src_mask, tgt)
    memory = jax.jit(functools.partial(apply, method="encode"))(src, src_mask)
    cache = jax.jit(functools.partial(apply, method="init_cache"), static_argnums=1)(memory, 16)
    assert jax.tree.map(jnp.shape, cache["self"][1]) == {"c": (2, 32)}
    decode = jax.jit(functools.partial(apply, method="decode"))
    steps = []
    for index in range(tgt.shape[1]):  # one token at a time: the state carries the prefix
        logits, cache = decode(
            tgt[:, index : index + 1], memory_mask=src_mask, cache=cache, cache_index=index
        )
        steps.append(logits)
    diff = np.abs(np.concatenate(steps, axis=1) - np.asarray(full)).max()
    print(f"SSRU cached vs full decoding: max |logit diff| {diff:.2e}")
    assert diff < 1e-5
    # Position 0 embeds zeros whatever its id (Marian's start); later ids matter.
    for other, same in ((0, True), (1, False)):
        changed = tgt.copy()
        changed[:, other] = (changed[:, other] + 1) % 64
        moved = np.abs(np.asarray(forward(src, src_mask, changed)) - full)[:, -1].max()
        assert (moved == 0) == same, other
    # The scanned layout (params stacked per layer) computes the same.
    scanned_config = dataclasses.replace(TINY_SSRU, scan_layers=True)
    stacks = marian.FAMILY.layer_stacks(scanned_config)
    stacked = hf_mapping.params_from_hf(
        hf_mapping.params_to_hf(params, marian.FAMILY.with_head("translation"), TINY_SSRU),
        marian.FAMILY.with_head("translation"),
        scanned_config,
    )[0]
    assert set(stacks) == {"model/encoder/layers", "model/decoder/layers"}
    scanned = jax.jit(marian.MarianMTModel(scanned_config).apply)(
        {"params": stacked}, src, src_mask, tgt
    )
    np.testing.assert_allclose(scanned, full, atol=1e-5)


def test_lora_targets_every_projection_of_both_decoder_cells():
    targets = r".*/(q_proj|k_proj|v_proj|out_proj|fc1|fc2|x_proj|forget_proj)/kernel"
    for config, cell_projections in ((TINY, 4), (TINY_SSRU, 2)):
        config = dataclasses.replace(config, lora=lora.LoraConfig(rank=2, targets=targets))
        adapted = lora.adapter_paths(list(_flat_boxed(config)))
        # Encoder layer: 4 attention projections + fc1 + fc2; decoder: its cell's
        # projections + 4 of cross-attention + fc1 + fc2; an A and a B per projection.
        per_decoder_layer = cell_projections + 4 + 2
        assert len(adapted) == 2 * (6 * config.encoder_layers + per_decoder_layer * 2)
    default = dataclasses.replace(
        TINY_SSRU, lora=lora.LoraConfig(rank=2, targets=marian.FAMILY.lora_targets)
    )
    adapted = lora.adapter_paths(list(_flat_boxed(default)))
    assert adapted and all("/q_proj/" in p or "/v_proj/" in p for p in adapted)


def test_config_from_hf_registry_and_errors(tiny_marian_dir):
    hf_config = model_files.read_hf_config(tiny_marian_dir)
    config = marian_config.MarianConfig.from_hf(hf_config, remat="full", dtype="bfloat16")
    assert (config.d_model, config.remat, config.dtype) == (32, "full", "bfloat16")
    hash(config)  # a jit static argument
    assert models.family_for("marian") is marian.FAMILY
    assert marian.FAMILY.with_head("translation").class_name("marian") == "MarianMTModel"
    for key in ("share_encoder_decoder_embeddings", "tie_word_embeddings"):
        with pytest.raises(ValueError, match=key):
            marian_config.MarianConfig.from_hf({**hf_config, key: False})
    with pytest.raises(ValueError, match="decoder_vocab_size"):
        marian_config.MarianConfig.from_hf({**hf_config, "decoder_vocab_size": 7})
    with pytest.raises(ValueError, match="decoder_cell='lstm'"):
        marian_config.MarianConfig.from_hf({**hf_config, "decoder_cell": "lstm"})
    with pytest.raises(ValueError, match="speech_recognition"):
        marian.FAMILY.module_for(TINY, "speech_recognition")
    module = marian.MarianMTModel(TINY_SSRU)
    ids = np.zeros((1, 129), np.int32)
    shapes = functools.partial(jax.eval_shape, module.apply, {"params": tiny_ssru_params()})
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        shapes(ids, None, ids[:, :4])
    with pytest.raises(ValueError, match="not both"):
        jax.eval_shape(
            functools.partial(module.apply, method="decode"), {"params": tiny_ssru_params()}, ids
        )
