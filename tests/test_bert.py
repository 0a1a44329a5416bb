"""BERT contracts: parity with transformers, logical names, weight round trip, dropout."""

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
from finetune_jax.models import bert, bert_hf, hf_mapping
from tests.helpers import check_remat_and_bfloat16, load_bert


def from_hf(tensors, config):
    """HF tensors -> (our `bert` subtree, absent optional prefixes), the encoder alone."""
    params, missing = hf_mapping.params_from_hf(tensors, bert.FAMILY, config)
    return params["bert"], missing


def to_hf(params, config):
    return hf_mapping.params_to_hf(params, bert.FAMILY, config)


SENTENCES = [
    "A short one.",
    "This sentence is quite a bit longer than the first, so it needs more tokens.",
    "Medium length sentence here.",
]
TINY = bert.BertConfig(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=32,
    max_position_embeddings=16,
    num_labels=3,
)


def _tokenize(model_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    return tokenizer(SENTENCES, padding=True, return_tensors="np")


def _load_with_hf_head(model_dir):
    """Test-only: our classifier with the head taken from the HF file instead of init."""
    config, module, params = load_bert(model_dir, num_labels=2)
    hf = model_files.read_safetensors(model_dir)
    params["classifier"] = {"kernel": hf["classifier.weight"].T, "bias": hf["classifier.bias"]}
    return config, module, params


def test_minilm_parity_with_transformers(minilm_dir):
    batch = _tokenize(minilm_dir)
    assert len(set(batch["attention_mask"].sum(1))) == 3, "want three different lengths"
    config, _, params = load_bert(minilm_dir, num_labels=2)
    hidden, pooled = bert.BertModel(config).apply(
        {"params": params["bert"]},
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
    )
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        out = reference(**{k: torch.from_numpy(v) for k, v in batch.items()})
    keep = batch["attention_mask"].astype(bool)
    hidden_diff = np.abs(np.asarray(hidden) - out.last_hidden_state.numpy())[keep].max()
    pooled_diff = np.abs(np.asarray(pooled) - out.pooler_output.numpy()).max()
    print(f"MiniLM max |diff|: last_hidden_state {hidden_diff:.2e}, pooled {pooled_diff:.2e}")
    assert hidden_diff < 1e-4
    assert pooled_diff < 1e-4


def test_tiny_classifier_logits_match_transformers(tiny_bert_dir):
    batch = _tokenize(tiny_bert_dir)
    config, module, params = _load_with_hf_head(tiny_bert_dir)
    logits = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
    reference = transformers.BertForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits
    diff = np.abs(np.asarray(logits) - expected.numpy()).max()
    print(f"tiny classifier max |logit diff|: {diff:.2e}")
    assert logits.dtype == jnp.float32 and logits.shape == (3, 2)
    assert diff < 1e-5


def test_every_param_has_logical_names():
    boxed = bert.init_params(TINY, jax.random.PRNGKey(0))
    leaves = jax.tree_util.tree_leaves_with_path(
        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )
    assert len(leaves) == 5 + 16 * TINY.num_hidden_layers + 4
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), name
        assert len(leaf.names) == leaf.value.ndim, (name, leaf.names, leaf.value.shape)


def test_param_paths_and_shapes():
    shapes = jax.eval_shape(functools.partial(bert.init_params, TINY), jax.random.PRNGKey(0))
    flat = {
        "/".join(k.key for k in path): leaf.value.shape
        for path, leaf in jax.tree_util.tree_leaves_with_path(
            shapes, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )
    }
    assert flat["bert/encoder/layer_1/attention/query/kernel"] == (16, 4, 4)
    assert flat["bert/encoder/layer_1/attention/query/bias"] == (4, 4)
    assert flat["bert/encoder/layer_1/attention/output/kernel"] == (4, 4, 16)
    assert flat["bert/encoder/layer_0/output/kernel"] == (32, 16)
    assert flat["bert/encoder/layer_0/output/LayerNorm/scale"] == (16,)
    assert flat["bert/pooler/dense/kernel"] == (16, 16)
    assert flat["classifier/kernel"] == (16, 3)
    # Every param is reached by the HF mapping or is the new head.
    mapped = {m.path for m in bert.FAMILY.hf_param_mappings(TINY)}
    assert set(flat) == mapped
    assert {"bert/" + m.path for m in bert_hf.hf_mappings(TINY)} <= mapped


def test_to_hf_from_hf_round_trip(tiny_bert_dir):
    hf = model_files.read_safetensors(tiny_bert_dir)
    config = bert.BertConfig.from_hf(model_files.read_hf_config(tiny_bert_dir))
    params, missing = from_hf(hf, config)
    assert missing == []
    classifier = {"kernel": hf["classifier.weight"].T, "bias": hf["classifier.bias"]}
    back = to_hf({"bert": params, "classifier": classifier}, config)
    expected = {k: v for k, v in hf.items() if not k.endswith("position_ids")}
    assert set(back) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)


def test_from_hf_accepts_keys_without_prefix_and_reports_missing_pooler():
    params = nn.meta.unbox(bert.init_params(TINY, jax.random.PRNGKey(1)))
    hf = {
        k.removeprefix("bert."): v
        for k, v in to_hf(params, TINY).items()
        if not k.startswith(("classifier", "bert.pooler"))
    }
    loaded, missing = from_hf(hf, TINY)
    assert missing == ["bert/pooler"] and "pooler" not in loaded
    np.testing.assert_array_equal(
        loaded["encoder"]["layer_1"]["attention"]["key"]["kernel"],
        params["bert"]["encoder"]["layer_1"]["attention"]["key"]["kernel"],
    )


def test_load_pretrained_keeps_init_pooler_when_checkpoint_has_none(tmp_path):
    params = nn.meta.unbox(bert.init_params(TINY, jax.random.PRNGKey(1)))
    hf = {k: v for k, v in to_hf(params, TINY).items() if "pooler" not in k}
    hf_config = {"model_type": "bert", **dataclasses.asdict(TINY)}
    model_files.write_safetensors(hf, tmp_path, hf_config)
    _, _, loaded = load_bert(tmp_path, num_labels=3, seed=0)
    init = nn.meta.unbox(bert.init_params(TINY, jax.random.PRNGKey(0)))
    np.testing.assert_array_equal(
        loaded["bert"]["pooler"]["dense"]["kernel"], init["bert"]["pooler"]["dense"]["kernel"]
    )
    np.testing.assert_array_equal(
        loaded["bert"]["embeddings"]["LayerNorm"]["scale"],
        params["bert"]["embeddings"]["LayerNorm"]["scale"],
    )


def test_wrong_shape_and_missing_tensor_errors():
    params = nn.meta.unbox(bert.init_params(TINY, jax.random.PRNGKey(0)))
    hf = to_hf(params, TINY)
    key = "bert.encoder.layer.1.intermediate.dense.weight"
    bad = {**hf, key: np.zeros((5, 16), np.float32)}
    with pytest.raises(ValueError) as error:
        from_hf(bad, TINY)
    message = str(error.value)
    for part in (
        key,
        "bert/encoder/layer_1/intermediate/kernel",
        "(5, 16)",
        "(32, 16)",
        "(16, 32)",
    ):
        assert part in message
    del hf["bert.encoder.layer.0.output.LayerNorm.bias"]
    with pytest.raises(ValueError, match="layer_0/output/LayerNorm/bias"):
        from_hf(hf, TINY)


def test_unknown_model_type_is_an_error():
    assert models.family_for("bert") is bert.FAMILY
    with pytest.raises(ValueError, match="'gpt_neox'.*bert"):
        models.family_for("gpt_neox")


def test_config_from_hf():
    config = bert.BertConfig.from_hf(
        {
            "hidden_size": 16,
            "num_attention_heads": 4,
            "id2label": {"0": "a", "1": "b", "2": "c"},
            "dtype": "bfloat16",
            "architectures": ["BertModel"],
        },
        remat="full",
    )
    assert (config.num_labels, config.dtype, config.remat) == (3, "float32", "full")
    with pytest.raises(ValueError, match="Unsupported activation"):
        bert.BertConfig(hidden_act="mish")
    with pytest.raises(ValueError, match="relative_key"):
        bert.BertConfig.from_hf({"position_embedding_type": "relative_key"})


def test_dropout_uses_rng_only_when_not_deterministic():
    config = dataclasses.replace(TINY, hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    module = bert.BertForSequenceClassification(config)
    # Dropout rates do not change the params: reuse TINY's (already compiled) init.
    params = nn.meta.unbox(bert.init_params(TINY, jax.random.PRNGKey(0)))
    ids = jnp.arange(24).reshape(2, 12) % config.vocab_size
    mask = jnp.ones_like(ids)

    @functools.partial(jax.jit, static_argnums=1)
    def run(seed, deterministic):
        return module.apply(
            {"params": params},
            ids,
            mask,
            deterministic=deterministic,
            rngs={"dropout": jax.random.PRNGKey(seed)},
        )

    assert not np.allclose(run(1, False), run(2, False))
    np.testing.assert_array_equal(run(1, True), run(2, True))


def test_remat_and_bfloat16_variants():
    params = nn.meta.unbox(bert.init_params(TINY, jax.random.PRNGKey(0)))
    check_remat_and_bfloat16(bert.BertForSequenceClassification, TINY, params, bf16_atol=3e-2)
