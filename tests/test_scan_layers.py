"""`scan_layers` contracts: the scanned layout computes what the unrolled one does (logits,
gradients, KV-cache generation; Llama with GQA, sliding windows, LoRA and remat; BERT), its
stacked params carry a `layers` axis, load from / export to HF like the unrolled ones
re-stacked, per-layer optimizer presets step alike, and a train run works end to end."""

from __future__ import annotations

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from finetune_jax import train as train_lib
from finetune_jax import tree_paths
from finetune_jax.cluster import sharding
from finetune_jax.config import base_config
from finetune_jax.evaluation.lm_generation import Generator, SamplingConfig
from finetune_jax.hf import adapters
from finetune_jax.models import bert, hf_mapping, llama, llama_config
from finetune_jax.models import lora as lora_lib
from finetune_jax.training import optim
from tests import test_llama
from tests.helpers import load_bert, load_llama, run_steps, tiny_config
from tests.test_sft_train import tiny_sft_config

LLAMA_STACK, BERT_STACK = "model/layers", "bert/encoder/layer"
# GQA (4:2 heads), a 3-token window on layer 0 and full attention on layer 1 (Mistral-style),
# a wide init so differences show.
SLIDING = dataclasses.replace(
    test_llama.TINY,
    model_type="mistral",
    sliding_window=3,
    layer_types=(llama_config.SLIDING, "full_attention"),
    initializer_range=0.1,
)
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=r".*/(self_attn|mlp)/\w+_proj/kernel")
TINY_BERT = bert.BertConfig(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=32,
    max_position_embeddings=16,
    num_labels=3,
)


def restack(params, stack: str):
    """Unrolled params with the layers `<stack>_<i>/...` stacked into `<stack>/...`."""
    flat, layers = {}, {}
    for path, value in lora_lib.flat_paths(params).items():
        if found := re.fullmatch(re.escape(stack) + r"_(\d+)/(.*)", path):
            layers.setdefault(f"{stack}/{found.group(2)}", {})[int(found.group(1))] = value
        else:
            flat[path] = value
    for path, values in layers.items():
        flat[path] = np.stack([np.asarray(values[i]) for i in range(len(values))])
    return lora_lib.nested(flat)


def assert_trees_close(actual, expected, atol):
    actual, expected = lora_lib.flat_paths(actual), lora_lib.flat_paths(expected)
    assert sorted(actual) == sorted(expected)
    for path in expected:
        np.testing.assert_allclose(actual[path], expected[path], atol=atol, err_msg=path)


def _randomize_lora_b(params, seed=0):
    """A trained-looking adapter: fresh B is zero, which would hide a mis-stacked A."""
    rng = np.random.default_rng(seed)
    flat = lora_lib.flat_paths(params)
    for path in [p for p in flat if p.endswith("lora_b")]:
        flat[path] = rng.normal(0, 0.1, np.shape(flat[path])).astype(np.float32)
    return lora_lib.nested(flat)


@functools.cache
def _unrolled_params(config):
    params = nn.unbox(llama.init_params(config, jax.random.PRNGKey(0)))
    return _randomize_lora_b(params) if config.lora is not None else params


def _logits_and_grads(module, params, ids, mask):
    weights = jax.random.normal(jax.random.PRNGKey(1), (*ids.shape, module.config.vocab_size))

    def loss(p):
        logits = module.apply({"params": p}, ids, mask)
        return jnp.sum(logits * weights), logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"remat": "full"}, {"lora": LORA, "remat": "dots_saveable"}],
    ids=["gqa_sliding", "remat_full", "lora_dots_saveable"],
)
def test_scanned_llama_equals_unrolled(overrides):
    config = dataclasses.replace(SLIDING, **overrides)
    scanned_config = dataclasses.replace(config, scan_layers=True)
    params = _unrolled_params(config)
    stacked = restack(params, LLAMA_STACK)
    # Init builds the same tree, stacked (LoRA leaves included).
    scanned_init = jax.eval_shape(llama.init_params, scanned_config, jax.random.PRNGKey(0))
    assert jax.tree.map(np.shape, nn.unbox(scanned_init)) == jax.tree.map(np.shape, stacked)
    ids, mask = test_llama._batch(10, [10, 6], padding="right")
    ids = ids % config.vocab_size
    (_, logits), grads = _logits_and_grads(llama.LlamaForCausalLM(config), params, ids, mask)
    (_, scanned_logits), scanned_grads = _logits_and_grads(
        llama.LlamaForCausalLM(scanned_config), stacked, ids, mask
    )
    np.testing.assert_allclose(scanned_logits, logits, atol=1e-5)
    assert_trees_close(scanned_grads, restack(grads, LLAMA_STACK), atol=1e-4)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_bert_equals_unrolled(remat):
    config = dataclasses.replace(
        TINY_BERT, remat=remat, lora=lora_lib.LoraConfig(rank=2, alpha=4.0)
    )
    scanned = dataclasses.replace(config, scan_layers=True)
    params = _randomize_lora_b(nn.unbox(bert.init_params(config, jax.random.PRNGKey(0))))
    stacked = restack(params, BERT_STACK)
    scanned_init = jax.eval_shape(bert.init_params, scanned, jax.random.PRNGKey(0))
    assert jax.tree.map(np.shape, nn.unbox(scanned_init)) == jax.tree.map(np.shape, stacked)
    ids = jnp.arange(24).reshape(2, 12) % config.vocab_size
    mask = jnp.ones_like(ids).at[1, 7:].set(0)

    def logits_and_grads(module_config, p):
        module = bert.BertForSequenceClassification(module_config)
        loss = lambda p: (module.apply({"params": p}, ids, mask) ** 2).sum()
        return jax.jit(jax.value_and_grad(loss))(p)

    loss, grads = logits_and_grads(config, params)
    scanned_loss, scanned_grads = logits_and_grads(scanned, stacked)
    np.testing.assert_allclose(scanned_loss, loss, rtol=1e-5)
    assert_trees_close(scanned_grads, restack(grads, BERT_STACK), atol=1e-5)


def test_stacked_params_carry_the_layers_axis_and_shard_by_the_rules():
    config = dataclasses.replace(SLIDING, lora=LORA, scan_layers=True)
    boxed = jax.eval_shape(llama.init_params, config, jax.random.PRNGKey(0))
    specs = lora_lib.flat_paths(nn.get_partition_spec(boxed))
    q_proj = ("layers", "embed", "heads", "kv")
    assert tuple(specs["model/layers/self_attn/q_proj/kernel"]) == q_proj
    assert tuple(specs["model/layers/self_attn/q_proj/lora_a"]) == ("layers", "embed", "lora_rank")
    assert tuple(specs["model/embed_tokens/embedding"]) == ("vocab", "embed")
    mesh = sharding.make_mesh(base_config().mesh, jax.devices()[:1])
    shardings = sharding.param_shardings(boxed, mesh, sharding.logical_rules(base_config()))
    assert lora_lib.flat_paths(shardings)["model/layers/mlp/up_proj/kernel"].spec[0] is None


def test_lora_targets_match_per_layer_paths_when_scanned():
    """Targets written against per-layer paths adapt the same kernels in both layouts; one
    that picks some layers of a stack cannot be stacked and says so."""
    every = lora_lib.LoraConfig(rank=2, targets=r"model/layers_\d+/self_attn/q_proj/kernel")
    config = dataclasses.replace(SLIDING, lora=every, scan_layers=True)
    paths = tree_paths.param_paths(jax.eval_shape(llama.init_params, config, jax.random.key(0)))
    assert [p for p in paths if "lora" in p] == [
        "model/layers/self_attn/q_proj/lora_a/value",
        "model/layers/self_attn/q_proj/lora_b/value",
    ]
    first = dataclasses.replace(every, targets=r"model/layers_0/self_attn/q_proj/kernel")
    with pytest.raises(ValueError, match="matches 1 of the 2 layers .* model.scan_layers=False"):
        llama.init_params(dataclasses.replace(config, lora=first), jax.random.key(0))


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_hf_load_export_and_adapter_in_scanned_layout(name, request):
    """Loading in the scanned layout gives the unrolled params re-stacked (rows carry the
    layer index); export gives back the same HF tensors; merge and HF PEFT tensors of a
    stacked adapter equal the unrolled ones."""
    model_dir = request.getfixturevalue(f"tiny_{name}_dir")
    load, stack = (load_llama, LLAMA_STACK) if name == "llama" else (load_bert, BERT_STACK)
    lora = lora_lib.LoraConfig(rank=2, targets=r".*/(q_proj|v_proj|query|value)/kernel")
    config, _, params = load(model_dir, lora=lora)
    scanned_config, _, scanned = load(model_dir, lora=lora, scan_layers=True)
    family = llama.FAMILY if name == "llama" else bert.FAMILY
    rows = family.hf_param_mappings(scanned_config)
    stacked_rows = [m for m in rows if m.layer is not None]
    assert stacked_rows and all(m.path.startswith(stack + "/") for m in stacked_rows)
    assert set(hf_mapping.layer_counts(rows).values()) == {config.num_hidden_layers}
    # LoRA A is drawn per layout (the scan splits the init rng), the rest is the checkpoint.
    base = lambda p: {k: v for k, v in lora_lib.flat_paths(p).items() if "lora_a" not in k}
    assert_trees_close(base(scanned), base(restack(params, stack)), atol=0)
    params = _randomize_lora_b(params)
    scanned = restack(params, stack)
    exported = hf_mapping.params_to_hf(params, family, config)
    scanned_exported = hf_mapping.params_to_hf(scanned, family, scanned_config)
    assert_trees_close(scanned_exported, exported, atol=0)
    merged = lora_lib.merge(scanned, scanned_config.lora)
    assert_trees_close(merged, restack(lora_lib.merge(params, lora), stack), atol=1e-6)
    peft = adapters.hf_adapter_tensors(scanned, rows)
    assert_trees_close(
        peft, adapters.hf_adapter_tensors(params, family.hf_param_mappings(config)), 0
    )


def test_generation_with_scanned_layers():
    """Stacked KV cache inside the scan: greedy tokens and cached logits as unrolled."""
    config = dataclasses.replace(SLIDING, remat="full")
    scanned = dataclasses.replace(config, scan_layers=True)
    params = _unrolled_params(config)
    stacked = restack(params, LLAMA_STACK)
    cache = llama.init_cache(scanned, 3, 16)
    assert cache["k"].shape == (2, 3, 16, config.num_key_value_heads, config.head_dim)
    prompts = [[5, 9, 13, 2, 7], [11, 3], [4, 8, 15, 16, 23, 42, 1]]
    outputs = []
    for module_config, p in ((config, params), (scanned, stacked)):
        module = llama.LlamaForCausalLM(module_config)
        generator = Generator(module, (), 0, SamplingConfig(8), prompt_buckets=(8,))
        outputs.append(generator.generate(p, prompts, batch_size=2))
    assert outputs[1] == outputs[0] and len(outputs[0][0]) == 8


def _bert_run_config(model_dir, data_dir, scan: bool, **optim_values):
    config = tiny_config(model_dir, data_dir)
    config.model.scan_layers = scan
    config.model.dropout = 0.0  # the layouts draw dropout masks differently
    config.optim.warmup_fraction = 0.0
    for key, value in optim_values.items():
        config.optim[key] = value
    return config


@pytest.mark.parametrize(
    "preset", [{"preset": "top_k_layers", "top_k": 1}, {"preset": "llrd", "llrd_decay": 0.5}]
)
def test_per_layer_presets_step_like_unrolled(tiny_bert_dir, sst2_slice, preset):
    """Layers of one stacked leaf with different labels (a frozen layer, llrd multipliers)
    get a per-layer group; one step moves params exactly as the unrolled layout does,
    clipping included, and the group table says what happened."""
    steps = {}
    for scan in (False, True):
        config = _bert_run_config(tiny_bert_dir, sst2_slice, scan, **preset)
        exp, state, _ = run_steps(config, 1)
        steps[scan] = (exp, jax.device_get(state.params))
    (exp, params), (scanned_exp, scanned_params) = steps[False], steps[True]
    pretrained = jax.device_get(exp.pretrained_params())
    scanned_pretrained = jax.device_get(scanned_exp.pretrained_params())
    assert_trees_close(scanned_pretrained, restack(pretrained, BERT_STACK), atol=0)
    assert_trees_close(scanned_params, restack(params, BERT_STACK), atol=1e-6)
    moved = lambda a, b, path: not np.array_equal(a[path], b[path])
    before, after = lora_lib.flat_paths(scanned_pretrained), lora_lib.flat_paths(scanned_params)
    assert moved(before, after, f"{BERT_STACK}/intermediate/kernel")
    assert optim.param_counts(
        scanned_exp.groups, scanned_exp.abstract_params
    ) == optim.param_counts(exp.groups, exp.abstract_params)
    table = optim.group_table(scanned_exp.groups, scanned_exp.abstract_params)
    assert re.search(r"per-layer lr x[\d.]+\.\.[\d.]+ .*\(2 layers, stacked\)", table), table
    if preset["preset"] == "top_k_layers":
        layer0 = lambda p: lora_lib.flat_paths(p)[f"{BERT_STACK}/intermediate/kernel"][0]
        np.testing.assert_array_equal(layer0(scanned_params), layer0(scanned_pretrained))
        assert "keep optimizer state and compute gradients for their frozen layers" in table


def test_train_runs_end_to_end_with_scan_layers(tiny_bert_dir, sst2_slice, tmp_path):
    config = _bert_run_config(tiny_bert_dir, sst2_slice, True)
    summary = train_lib.train(config, str(tmp_path))
    assert summary["final_step"] == config.train.max_steps and summary["best"] is not None
    # Resuming reads the stacked checkpoint back.
    config.train.max_steps = 7
    assert train_lib.train(config, str(tmp_path))["final_step"] == 7


def test_lora_sft_with_scan_layers(tiny_chat_llama_dir):
    """The causal-LM path (chat data, LoRA preset, stacked adapters) trains when scanned."""
    config = tiny_sft_config(tiny_chat_llama_dir, **{"model.scan_layers": True})
    exp, state, losses = run_steps(config, 2)
    before = lora_lib.flat_paths(jax.device_get(exp.pretrained_params()))
    after = lora_lib.flat_paths(jax.device_get(state.params))
    assert f"{LLAMA_STACK}/self_attn/q_proj/lora_b" in before
    for path in before:
        assert (not np.array_equal(before[path], after[path])) == ("/lora_" in path), path
    assert all(np.isfinite(losses))
