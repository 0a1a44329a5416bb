"""Llama-family contracts: parity with transformers (Llama, Qwen2, Mistral, RoPE scalings),
packing, logical names, weight round trip and errors, remat / bf16 variants."""

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
from finetune_jax.hf import model_files
from finetune_jax.models import hf_mapping, llama, llama_config, llama_hf
from tests.helpers import check_remat_and_bfloat16, load_llama


def from_hf(tensors, config):
    """HF tensors -> our full param tree, through the generic family mapping."""
    return hf_mapping.params_from_hf(tensors, llama.FAMILY, config)[0]


def to_hf(params, config):
    return hf_mapping.params_to_hf(params, llama.FAMILY, config)


TINY = llama.LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
# Shared by the small HF models built in memory below (hidden 64, head_dim 16, GQA 4:2).
HF_SHAPE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
ROPE_THETA = 10000.0


def _batch(length: int, lengths: list[int], padding: str = "right", seed: int = 0):
    """Random ids [B, length] and a 0/1 attention mask with the given real lengths."""
    ids = np.random.default_rng(seed).integers(1, 256, (len(lengths), length)).astype(np.int32)
    mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    if padding == "left":
        mask = mask[:, ::-1].copy()
    return ids, mask


def _hf_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(
            input_ids=torch.from_numpy(ids).long(),
            attention_mask=None if mask is None else torch.from_numpy(mask).long(),
        )
    return out.logits.float().numpy()


@functools.cache
def _apply(config: llama.LlamaConfig):
    module = llama.LlamaForCausalLM(config)

    @jax.jit
    def apply(params, ids, mask=None, segment_ids=None, positions=None):
        return module.apply({"params": params}, ids, mask, segment_ids, positions)

    return apply


def _hf_model_in_memory(config_cls, model_cls, **kwargs):
    """A tiny random HF model with non-trivial norms and biases, as (our config, params, HF)."""
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**HF_SHAPE, **kwargs})).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    tensors = {k: v.float().numpy() for k, v in model.state_dict().items()}
    config = llama.LlamaConfig.from_hf(model.config.to_dict())
    return config, from_hf(tensors, config), model


@pytest.mark.parametrize("padding", ["right", "left"])
def test_tiny_llama_logits_match_transformers(tiny_llama_dir, padding):
    config, module, params = load_llama(tiny_llama_dir)
    assert isinstance(module, llama.LlamaForCausalLM)
    assert (config.num_key_value_heads, config.tie_word_embeddings) == (2, False)
    ids, mask = _batch(16, [16, 9, 4], padding)
    logits = _apply(config)(params, ids, mask)
    reference = transformers.LlamaForCausalLM.from_pretrained(
        tiny_llama_dir, dtype=torch.float32
    ).eval()
    expected = _hf_logits(reference, ids, mask)
    keep = mask.astype(bool)
    diff = np.abs(np.asarray(logits) - expected)[keep].max()
    print(f"tiny llama ({padding} padding) max |logit diff| over real tokens: {diff:.2e}")
    assert logits.dtype == jnp.float32 and logits.shape == (3, 16, 256)
    assert diff < 1e-4


VARIANTS = {
    "qwen2_biases": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen2_sliding_window": (
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        dict(use_sliding_window=True, sliding_window=5, max_window_layers=1),
    ),
    "mistral_sliding_window": (
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        dict(sliding_window=5),
    ),
    "llama_tied_with_biases": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(tie_word_embeddings=True, attention_bias=True, mlp_bias=True),
    ),
    "rope_linear": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(rope_parameters={"rope_type": "linear", "rope_theta": ROPE_THETA, "factor": 4.0}),
    ),
    "rope_llama3": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        # A short original context puts head_dim 16's frequencies in all three llama3 bands.
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": ROPE_THETA,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    "rope_dynamic_beyond_max_length": (
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        # 24 tokens > max_position_embeddings 16: HF grows the RoPE base, so must we.
        dict(
            max_position_embeddings=16,
            rope_parameters={"rope_type": "dynamic", "rope_theta": ROPE_THETA, "factor": 2.0},
        ),
    ),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_match_transformers(variant):
    config_cls, model_cls, kwargs = VARIANTS[variant]
    config, params, reference = _hf_model_in_memory(config_cls, model_cls, **kwargs)
    ids, mask = _batch(24, [24, 15])
    logits = _apply(config)(params, ids, mask)
    expected = _hf_logits(reference, ids, mask)
    diff = np.abs(np.asarray(logits) - expected)[mask.astype(bool)].max()
    print(f"{variant}: max |logit diff| over real tokens: {diff:.2e}")
    assert diff < 1e-4
    if variant.startswith("rope_"):
        # The variant must matter: plain RoPE gives different logits on the same weights.
        plain = dataclasses.replace(config, rope_scaling=None)
        assert np.abs(np.asarray(_apply(plain)(params, ids, mask)) - expected).max() > 1e-3
    if "sliding" in variant:
        assert config.sliding_window == 5 and llama_config.SLIDING in config.layer_types
        full = dataclasses.replace(config, layer_types=None)
        assert np.abs(np.asarray(_apply(full)(params, ids, mask)) - expected).max() > 1e-3


def test_packed_rows_equal_separate_sequences(tiny_llama_dir):
    config, _, params = load_llama(tiny_llama_dir)
    apply = _apply(config)
    ids, _ = _batch(15, [15], seed=1)
    first, second = ids[:, :5], ids[:, 5:12]
    segment_ids = np.array([[1] * 5 + [2] * 7 + [0] * 3], np.int32)
    positions = np.array([list(range(5)) + list(range(7)) + [0] * 3], np.int32)
    mask = (segment_ids > 0).astype(np.int32)
    packed = np.asarray(apply(params, ids, mask, segment_ids, positions))
    alone_first = np.asarray(apply(params, first))
    alone_second = np.asarray(apply(params, second))
    diff = max(
        np.abs(packed[:, :5] - alone_first).max(), np.abs(packed[:, 5:12] - alone_second).max()
    )
    print(f"packed vs separate max |logit diff|: {diff:.2e}")
    assert diff < 1e-5
    # Without segment ids the second sequence sees the first one.
    unpacked = np.asarray(apply(params, ids, mask, None, positions))
    assert np.abs(unpacked[:, 5:12] - alone_second).max() > 1e-3


def _flat_boxed(config):
    shapes = jax.eval_shape(functools.partial(llama.init_params, config), jax.random.PRNGKey(0))
    return {
        "/".join(k.key for k in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )
    }


def test_every_param_has_logical_names():
    for config in (TINY, dataclasses.replace(TINY, tie_word_embeddings=True)):
        flat = _flat_boxed(config)
        tied = config.tie_word_embeddings
        assert len(flat) == 1 + 9 * config.num_hidden_layers + 1 + (0 if tied else 1)
        for name, leaf in flat.items():
            assert isinstance(leaf, nn.Partitioned), name
            assert len(leaf.names) == leaf.value.ndim, (name, leaf.names, leaf.value.shape)
        assert ("lm_head/kernel" in flat) != tied


def test_param_paths_shapes_and_names():
    config = dataclasses.replace(TINY, attention_bias=True)
    flat = _flat_boxed(config)
    expected = {
        "model/embed_tokens/embedding": ((64, 32), ("vocab", "embed")),
        "model/layers_1/self_attn/q_proj/kernel": ((32, 4, 8), ("embed", "heads", "kv")),
        "model/layers_1/self_attn/q_proj/bias": ((4, 8), ("heads", "kv")),
        "model/layers_1/self_attn/k_proj/kernel": ((32, 2, 8), ("embed", "kv_heads", "kv")),
        "model/layers_1/self_attn/v_proj/bias": ((2, 8), ("kv_heads", "kv")),
        "model/layers_1/self_attn/o_proj/kernel": ((4, 8, 32), ("heads", "kv", "embed")),
        "model/layers_0/mlp/gate_proj/kernel": ((32, 48), ("embed", "mlp")),
        "model/layers_0/mlp/down_proj/kernel": ((48, 32), ("mlp", "embed")),
        "model/layers_0/input_layernorm/scale": ((32,), ("embed",)),
        "model/layers_0/post_attention_layernorm/scale": ((32,), ("embed",)),
        "model/norm/scale": ((32,), ("embed",)),
        "lm_head/kernel": ((32, 64), ("embed", "vocab")),
    }
    for path, (shape, names) in expected.items():
        assert (flat[path].value.shape, tuple(flat[path].names)) == (shape, names), path
    assert "model/layers_0/self_attn/o_proj/bias" not in flat  # Qwen2-style: q/k/v only
    # Every param is reached by the HF mapping.
    mapped = {"model/" + m.path for m in llama_hf.hf_mappings(config)} | {"lm_head/kernel"}
    assert set(flat) == mapped


def test_to_hf_from_hf_round_trip(tiny_llama_dir):
    hf = model_files.read_safetensors(tiny_llama_dir)
    config = llama.LlamaConfig.from_hf(model_files.read_hf_config(tiny_llama_dir))
    back = to_hf(from_hf(hf, config), config)
    assert set(back) == set(hf)
    for key, value in hf.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_wrong_shape_and_missing_tensor_errors():
    params = nn.meta.unbox(llama.init_params(TINY, jax.random.PRNGKey(0)))
    hf = to_hf(params, TINY)
    key = "model.layers.1.mlp.down_proj.weight"
    with pytest.raises(ValueError) as error:
        from_hf({**hf, key: np.zeros((32, 5), np.float32)}, TINY)
    for part in (key, "model/layers_1/mlp/down_proj/kernel", "(32, 5)", "(48, 32)", "(32, 48)"):
        assert part in str(error.value)
    extra = "model.layers.0.self_attn.q_proj.bias"  # biases the config does not enable
    with pytest.raises(ValueError, match=f"no place.*{extra}"):
        from_hf({**hf, extra: np.zeros((32,), np.float32)}, TINY)
    del hf["lm_head.weight"]
    with pytest.raises(ValueError, match="'lm_head.weight'.*lm_head/kernel"):
        from_hf(hf, TINY)
    # Tied configs need no head tensor.
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    assert "lm_head" not in from_hf(hf, tied)


def test_config_from_hf():
    config = llama.LlamaConfig.from_hf(
        {
            "model_type": "llama",
            "hidden_size": 32,
            "num_attention_heads": 4,
            "rope_theta": 500000.0,
            "rope_scaling": {"type": "linear", "factor": 2.0},
            "attention_bias": True,
            "eos_token_id": [1, 2],
            "dtype": "bfloat16",
        },
        remat="full",
    )
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0}
    assert (config.rope_theta, config.head_dim, config.num_key_value_heads) == (5e5, 8, 4)
    assert (config.attention_bias, config.o_proj_bias) == (True, True)
    assert (config.dtype, config.remat, config.eos_token_id) == ("float32", "full", (1, 2))
    hash(config)  # a jit static argument
    qwen = llama.LlamaConfig.from_hf({"model_type": "qwen2", "sliding_window": 8})
    assert (qwen.attention_bias, qwen.o_proj_bias, qwen.sliding_window) == (True, False, None)
    with pytest.raises(ValueError, match="yarn"):
        llama.LlamaConfig.from_hf({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}})
    with pytest.raises(ValueError, match="gpt2"):
        llama.LlamaConfig.from_hf({"model_type": "gpt2"})
    with pytest.raises(ValueError, match="multiple"):
        llama.LlamaConfig(num_attention_heads=6, num_key_value_heads=4)


def test_registry():
    for model_type in ("llama", "qwen2", "mistral"):
        assert models.family_for(model_type) is llama.FAMILY


def test_remat_and_bfloat16_variants():
    params = nn.meta.unbox(llama.init_params(TINY, jax.random.PRNGKey(0)))
    check_remat_and_bfloat16(llama.LlamaForCausalLM, TINY, params, bf16_atol=5e-2)


def test_hidden_state_through_logits_from_hidden_equals_logits():
    # The chunked causal-LM loss relies on this split of the forward pass (training/losses.py).
    for config in (TINY, dataclasses.replace(TINY, tie_word_embeddings=True)):
        module = llama.LlamaForCausalLM(config)
        params = nn.meta.unbox(llama.init_params(config, jax.random.PRNGKey(0)))
        ids = jnp.arange(12).reshape(2, 6) % config.vocab_size
        logits = module.apply({"params": params}, ids)
        hidden = module.apply({"params": params}, ids, return_hidden=True)
        assert hidden.shape == (2, 6, config.hidden_size)
        head = module.apply({"params": params}, hidden[:, 2:5], method="logits_from_hidden")
        assert head.dtype == jnp.float32
        np.testing.assert_allclose(head, logits[:, 2:5], rtol=1e-6, atol=1e-6)
