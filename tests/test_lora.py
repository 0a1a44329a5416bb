"""LoRA contracts: a fresh adapter changes nothing; only LoRA params and the head train, with
no optimizer state and no weight gradient for the frozen base; merging equals the adapter;
adapter files round-trip; HF PEFT loads our export and computes the same logits."""

from __future__ import annotations

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from finetune_jax.config import base_config
from finetune_jax.hf import adapters
from finetune_jax.models import bert, llama
from finetune_jax.models import lora as lora_lib
from finetune_jax.training import builder, optim
from tests import test_llama
from tests.helpers import load_bert, load_llama, run_steps, tiny_config

TINY_BERT = bert.BertConfig(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=32,
    max_position_embeddings=32,
)
TINY_LLAMA = test_llama.TINY
# Every DenseND kernel: split-head q/k/v, the 3-D attention / o_proj kernels, the MLP, and
# (Llama) the untied lm_head, so each kernel shape and the shared-scope modules are covered.
ALL_BERT = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=r"bert/encoder/.*/kernel")
ALL_LLAMA = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=r".*/kernel")
MODELS = {
    "bert": (bert.BertForSequenceClassification, TINY_BERT, ALL_BERT, bert.init_params),
    "llama": (llama.LlamaForCausalLM, TINY_LLAMA, ALL_LLAMA, llama.init_params),
}


@functools.cache
def _init(name: str, with_lora: bool):
    """Unboxed params of a tiny model from PRNGKey(0), cached: compiling init dominates."""
    _, config, lora, init = MODELS[name]
    config = dataclasses.replace(config, lora=lora) if with_lora else config
    return nn.meta.unbox(init(config, jax.random.PRNGKey(0)))


def _flat(params):
    return traverse_util.flatten_dict(params, sep="/")


def _randomize_b(params, seed=0):
    """B = 0 makes every adapter a no-op; random B makes a wrong mapping visible."""
    rng = np.random.default_rng(seed)
    flat = {
        p: rng.normal(0.0, 0.1, np.shape(v)).astype(np.float32) if p.endswith("/lora_b") else v
        for p, v in _flat(params).items()
    }
    return traverse_util.unflatten_dict(flat, sep="/")


def _inputs():
    ids = jnp.arange(20).reshape(2, 10) % 64
    return ids, jnp.ones_like(ids).at[1, 6:].set(0)


def _logits(module, params, **kwargs):
    ids, mask = _inputs()
    apply = jax.jit(functools.partial(module.apply, **kwargs))  # kwargs stay static
    return np.asarray(apply({"params": params}, ids, mask))


@pytest.mark.parametrize("name", MODELS)
def test_fresh_adapter_leaves_params_and_outputs_unchanged(name):
    module_cls, config, lora, _ = MODELS[name]
    base, adapted = _init(name, False), _init(name, True)
    flat_base, flat_adapted = _flat(base), _flat(adapted)
    # LoRA params are created after kernel and bias: every other init draw is unchanged.
    assert set(flat_adapted) - set(flat_base) == {
        p for p in flat_adapted if lora_lib.is_adapter_path(p)
    }
    for path, value in flat_base.items():
        np.testing.assert_array_equal(flat_adapted[path], value, err_msg=path)
    for path, value in flat_adapted.items():
        if path.endswith("/lora_b"):
            assert not np.any(value), path
    # Eagerly, op by op, adding B = 0 is exact. (Under jit the extra ops change XLA's fusion
    # choices elsewhere, which moves logits by ~1e-9.)
    module = module_cls(dataclasses.replace(config, lora=lora))
    ids, mask = _inputs()
    np.testing.assert_array_equal(
        module.apply({"params": adapted}, ids, mask),
        module_cls(config).apply({"params": base}, ids, mask),
    )


@pytest.mark.parametrize("name", MODELS)
def test_merge_equals_base_plus_adapter(name):
    module_cls, config, lora, _ = MODELS[name]
    params = _randomize_b(_init(name, True))
    with_adapter = _logits(module_cls(dataclasses.replace(config, lora=lora)), params)
    merged = lora_lib.merge(params, lora)
    base = _init(name, False)
    assert jax.tree.structure(merged) == jax.tree.structure(base)  # loads into the base model
    # The adapter moves the logits well beyond the tolerance below.
    assert np.abs(with_adapter - _logits(module_cls(config), base)).max() > 1e-4
    np.testing.assert_allclose(_logits(module_cls(config), merged), with_adapter, atol=1e-5)


def _autodiff_lora_delta(x, a, b, scale, in_axes):
    """lora_delta's forward, left to autodiff."""
    contract = (tuple(range(x.ndim - in_axes, x.ndim)), tuple(range(in_axes)))
    h = jax.lax.dot_general(x, a, (contract, ((), ()))) * scale
    return jax.lax.dot_general(h, b, (((h.ndim - 1,), (0,)), ((), ())))


@pytest.mark.parametrize(
    "x_shape, a_shape, b_shape, in_axes",
    [
        ((2, 5, 6), (6, 3), (3, 7), 1),  # q/k/v style: [B, T, D] -> [B, T, out]
        ((2, 5, 4, 3), (4, 3, 2), (2, 6), 2),  # o_proj style: [B, T, heads, kv] -> [B, T, D]
        ((2, 5, 6), (6, 3), (3, 4, 2), 1),  # multi-dim output: [B, T, D] -> [B, T, H, K]
    ],
)
def test_lora_delta_gradients_equal_autodiff(x_shape, a_shape, b_shape, in_axes):
    """The hand-written backward (rank-sized operands transposed) is autodiff's maths."""
    keys = jax.random.split(jax.random.key(0), 4)
    x, a, b = (jax.random.normal(k, s) for k, s in zip(keys, (x_shape, a_shape, b_shape)))
    out_shape = jax.eval_shape(
        functools.partial(_autodiff_lora_delta, scale=2.0, in_axes=in_axes), x, a, b
    ).shape
    cotangent = jax.random.normal(keys[3], out_shape)

    def grads(fn):
        return jax.grad(lambda *xab: jnp.vdot(fn(*xab, 2.0, in_axes), cotangent), (0, 1, 2))(
            x, a, b
        )

    ours = jax.jit(lora_lib.lora_delta, static_argnums=(3, 4))(x, a, b, 2.0, in_axes)
    np.testing.assert_allclose(ours, _autodiff_lora_delta(x, a, b, 2.0, in_axes), rtol=1e-6)
    for mine, ref in zip(grads(lora_lib.lora_delta), grads(_autodiff_lora_delta)):
        assert mine.shape == ref.shape and mine.dtype == ref.dtype
        np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-6)


def test_lora_params_carry_names_derived_from_their_kernel():
    boxed = bert.init_params(dataclasses.replace(TINY_BERT, lora=ALL_BERT), jax.random.PRNGKey(0))
    flat = _flat(boxed)
    adapted = [p.removesuffix("/lora_a") for p in flat if p.endswith("/lora_a")]
    assert len(adapted) == 6 * TINY_BERT.num_hidden_layers  # q, k, v, attn out, FFN in, out
    for layer in adapted:
        kernel, a, b = (flat[f"{layer}/{leaf}"] for leaf in ("kernel", "lora_a", "lora_b"))
        n_in = a.value.ndim - 1
        assert a.names == (*kernel.names[:n_in], "lora_rank"), layer
        assert b.names == ("lora_rank", *kernel.names[n_in:]), layer
        assert a.value.shape == (*kernel.value.shape[:n_in], 4)
        assert b.value.shape == (4, *kernel.value.shape[n_in:])
    assert flat["bert/encoder/layer_0/attention/output/lora_a"].names == (
        "heads",
        "kv",
        "lora_rank",
    )
    # The default sharding rules place them like their base weight; the rank is replicated.
    rules = list(base_config().sharding.rules)
    query = "bert/encoder/layer_0/attention/query"
    assert nn.logical_to_mesh_axes(flat[f"{query}/lora_a"].names, rules) == P("fsdp", None)
    assert nn.logical_to_mesh_axes(flat[f"{query}/lora_b"].names, rules) == P(None, "tensor", None)


def test_lora_dropout_acts_only_when_not_deterministic():
    # Llama has no other dropout, so this also checks `deterministic` reaches every layer.
    lora = dataclasses.replace(ALL_LLAMA, dropout=0.5)
    module = llama.LlamaForCausalLM(dataclasses.replace(TINY_LLAMA, lora=lora))
    params = _randomize_b(_init("llama", True))  # dropout changes no param

    ids, mask = _inputs()

    @functools.partial(jax.jit, static_argnums=1)
    def run(seed, deterministic):
        rngs = {"dropout": jax.random.PRNGKey(seed)}
        return module.apply({"params": params}, ids, mask, deterministic=deterministic, rngs=rngs)

    assert not np.allclose(run(1, False), run(2, False))
    np.testing.assert_array_equal(run(1, True), run(2, True))


def test_lora_config_from_config_and_errors(tiny_llama_dir):
    config = tiny_config("unused", "unused")
    assert lora_lib.LoraConfig.from_config(config.peft) is None  # rank 0: off
    config.peft.rank = 8
    lora = lora_lib.LoraConfig.from_config(config.peft)
    assert (lora.rank, lora.scale, lora.targets) == (8, 2.0, config.peft.targets)
    assert hash(lora) == hash(lora_lib.LoraConfig.from_config(config.peft))  # a jit static
    with pytest.raises(ValueError, match=r"optim.preset=lora"):
        builder.lora_config(config)  # preset "full" would train the base too
    config.optim.preset = "lora"
    assert builder.lora_config(config) == lora
    config.peft.rank = 0
    with pytest.raises(ValueError, match=r"peft.rank > 0"):
        builder.lora_config(config)
    with pytest.raises(ValueError, match="dropout"):
        lora_lib.LoraConfig(rank=4, dropout=1.0)
    with pytest.raises(ValueError, match="regex"):
        lora_lib.LoraConfig(rank=4, targets="(")
    with pytest.raises(ValueError, match="matches no kernel"):
        load_llama(tiny_llama_dir, lora=lora_lib.LoraConfig(rank=4, targets="nothing"))


def test_load_pretrained_adds_seeded_lora_params(tiny_llama_dir):
    lora = lora_lib.LoraConfig(rank=4, targets=r".*/self_attn/(q_proj|v_proj)/kernel")
    _, _, base = load_llama(tiny_llama_dir)
    _, _, params = load_llama(tiny_llama_dir, lora=lora, seed=1)
    _, _, again = load_llama(tiny_llama_dir, lora=lora, seed=1)
    _, _, other = load_llama(tiny_llama_dir, lora=lora, seed=2)
    flat, flat_base = _flat(params), _flat(base)
    assert sorted(set(flat) - set(flat_base)) == [
        f"model/layers_{i}/self_attn/{proj}/{leaf}"
        for i in range(2)
        for proj in ("q_proj", "v_proj")
        for leaf in ("lora_a", "lora_b")
    ]
    for path, value in flat_base.items():
        np.testing.assert_array_equal(flat[path], value, err_msg=path)
    a = "model/layers_0/self_attn/q_proj/lora_a"
    np.testing.assert_array_equal(flat[a], _flat(again)[a])
    assert not np.array_equal(flat[a], _flat(other)[a])
    bound = 1 / np.sqrt(64)  # HF PEFT's kaiming-uniform: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert np.abs(flat[a]).max() <= bound and np.abs(flat[a]).max() > 0.8 * bound


def test_training_moves_only_lora_and_head(tiny_bert_dir, sst2_slice):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.peft.rank = 4
    config.optim.preset = "lora"
    exp, state, _ = run_steps(config, 3)
    after = _flat(jax.device_get(state.params))
    before = _flat(jax.device_get(exp.pretrained_params()))
    trainable = set(exp.trainable_paths)
    assert trainable == {
        p for p in before if lora_lib.is_adapter_path(p) or "pooler" in p or "classifier" in p
    }
    assert "bert/encoder/layer_1/attention/value/lora_b" in trainable
    assert not any(p.endswith(("key/lora_a", "intermediate/lora_a")) for p in before)
    for path, value in before.items():
        if path in trainable:
            assert not np.array_equal(after[path], value), path
        elif path not in trainable:
            assert np.array_equal(after[path], value), path  # bitwise
    trainable_count = sum(before[p].size for p in trainable)
    moments = 2 * 4 * trainable_count  # adam mu + nu in float32, for trainable leaves only
    state_bytes = optim.tree_bytes(state.opt_state)
    assert moments <= state_bytes <= moments + 64 * len(exp.groups.multipliers)


def _step_flops(config):
    exp = builder.build(config)
    state = exp.initial_state()
    batch = exp.put_batch(next(exp.data.train_batches()))
    cost = exp.train_step.lower(state, batch).compile().cost_analysis()
    return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"], batch["input_ids"].size


def test_lora_step_forms_no_dense_weight_gradient(tiny_bert_dir, sst2_slice):
    configs = {name: tiny_config(tiny_bert_dir, sst2_slice) for name in ("full", "lora", "dense")}
    configs["lora"].peft.rank = 1  # the LoRA terms' own cost scales with the rank
    configs["lora"].optim.preset = "lora"
    # The same layers trained densely: head + query/value kernels, dL/dW formed for each.
    dense = configs["dense"].optim
    dense.preset = "rules"
    dense.rules = (
        (bert.FAMILY.head.trained, "trainable"),
        (bert.FAMILY.lora_targets, "trainable"),  # what peft.targets='auto' adapts
        (".*", "frozen"),
    )
    flops = {}
    for name, config in configs.items():
        flops[name], tokens = _step_flops(config)
    # dL/dW for 2 kernels [D, D] per layer: 2 * tokens * D * D FLOPs each.
    weight_grads = 2 * 2 * 2 * tokens * 32 * 32
    assert flops["dense"] - flops["lora"] > 0.5 * weight_grads, flops
    assert flops["lora"] < 0.6 * flops["full"], flops


def test_adapter_file_round_trip(tmp_path, tiny_llama_dir):
    lora = lora_lib.LoraConfig(rank=4, targets=r".*/mlp/.*/kernel")
    _, _, params = load_llama(tiny_llama_dir, lora=lora)
    trained = _randomize_b(params)
    path = str(tmp_path / "adapter.safetensors")
    adapters.save_adapter(trained, path, lora)
    with safetensors.safe_open(path, "np") as f:
        assert json.loads(f.metadata()["lora"])["targets"] == lora.targets
        assert set(f.keys()) == set(_flat(lora_lib.adapter_params(trained)))
    loaded = adapters.load_adapter(params, path)
    for (p, x), y in zip(_flat(loaded).items(), _flat(trained).values()):
        np.testing.assert_array_equal(x, y, err_msg=p)
    other = lora_lib.LoraConfig(rank=4, targets=r".*/self_attn/q_proj/kernel")
    _, _, other_params = load_llama(tiny_llama_dir, lora=other)
    with pytest.raises(ValueError, match="does not fit"):
        adapters.load_adapter(other_params, path)


def _export(model_dir, tmp_path, name):
    """Our model with a random adapter, its HF PEFT export dir, and our logits."""
    ids, mask = _inputs()
    if name == "llama":
        config, module, params = load_llama(model_dir, lora=ALL_LLAMA)
        family, lora = llama.FAMILY, ALL_LLAMA
    else:
        config, module, params = load_bert(model_dir, num_labels=2, lora=ALL_BERT)
        family, lora = bert.FAMILY, ALL_BERT
    params = _randomize_b(params)
    out_dir = str(tmp_path / name)
    adapters.save_hf_peft(params, lora, family, config, out_dir, base_model_name=str(model_dir))
    return out_dir, _logits(module, params), (ids, mask)


def test_hf_peft_files(tmp_path, tiny_llama_dir):
    out_dir, _, _ = _export(tiny_llama_dir, tmp_path, "llama")
    adapter = json.load(open(f"{out_dir}/adapter_config.json"))
    assert (adapter["peft_type"], adapter["task_type"], adapter["r"]) == ("LORA", "CAUSAL_LM", 4)
    assert (adapter["lora_alpha"], adapter["modules_to_save"]) == (8.0, None)
    assert len(adapter["target_modules"]) == 2 * 7 + 1  # 7 projections per layer + lm_head
    assert "model.layers.1.self_attn.o_proj" in adapter["target_modules"]
    tensors = safetensors.numpy.load_file(f"{out_dir}/adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn"
    # [r, in] and [out, r]: o_proj's in is heads * head_dim; k_proj's out is kv_heads * 16.
    assert tensors[f"{key}.o_proj.lora_A.weight"].shape == (4, 64)
    assert tensors[f"{key}.k_proj.lora_B.weight"].shape == (32, 4)
    assert tensors["base_model.model.lm_head.lora_B.weight"].shape == (256, 4)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_hf_peft_library_loads_our_adapter(name, tmp_path, request):
    hf_peft = pytest.importorskip("peft")
    model_dir = request.getfixturevalue(f"tiny_{name}_dir")
    out_dir, ours, (ids, mask) = _export(model_dir, tmp_path, name)
    model_cls = {
        "llama": transformers.LlamaForCausalLM,
        "bert": transformers.BertForSequenceClassification,
    }[name]
    model = hf_peft.PeftModel.from_pretrained(model_cls.from_pretrained(model_dir), out_dir).eval()
    with torch.no_grad():
        theirs = model(
            input_ids=torch.tensor(np.asarray(ids)).long(),
            attention_mask=torch.tensor(np.asarray(mask)).long(),
        ).logits.numpy()
    if name == "llama":  # padded positions of a causal LM are not compared
        ours, theirs = ours[np.asarray(mask, bool)], theirs[np.asarray(mask, bool)]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
