"""DoRA, IA3 and prompt tuning (`peft.method`): their logits and gradients equal HF PEFT's
torch modules loaded from our adapter export (tiny random Llama and BERT), fresh adapters
change nothing, a few training steps move only the method's params and the head, the merged
export (DoRA, IA3) loads in transformers with our logits, scanned layers equal unrolled
ones, generation and packing work under prompt tuning, no dense weight gradient is formed,
and config mistakes are errors naming the key, before anything loads."""

from __future__ import annotations

import dataclasses
import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from jax.sharding import PartitionSpec as P

from finetune_jax.config import base_config
from finetune_jax.hf import adapters
from finetune_jax.models import bert, llama
from finetune_jax.models import lora as lora_lib
from finetune_jax.training import builder
from tests import test_llama
from tests.helpers import load_bert, load_llama, tiny_config

hf_peft = pytest.importorskip("peft")

# Each kernel shape (split-head q/k/v, the 3-D o_proj / attention output, the MLP, Llama's
# untied float32 lm_head) and the shared-scope modules are covered; IA3 scales the MLP's and
# the attention output's input, as PEFT's defaults do for BERT.
ADAPTERS = {
    "llama": {
        "dora": lora_lib.LoraConfig(
            rank=4, alpha=8.0, targets=r".*(q_proj|o_proj|down_proj|lm_head)/kernel", method="dora"
        ),
        "ia3": lora_lib.LoraConfig(
            rank=0, targets=r".*/kernel", method="ia3", feedforward=r".*/(down|o)_proj/kernel"
        ),
        "prompt": lora_lib.LoraConfig(rank=0, targets="", method="prompt", num_virtual_tokens=3),
    },
    "bert": {
        # Split-head query, the attention output (2 input dims), the shared-scope FFN output.
        "dora": lora_lib.LoraConfig(
            rank=4, alpha=8.0, targets=r"bert/encoder/.*/(query|output)/kernel", method="dora"
        ),
        "ia3": lora_lib.LoraConfig(
            rank=0,
            targets=bert.FAMILY.ia3_targets,
            method="ia3",
            feedforward=bert.FAMILY.ia3_feedforward,
        ),
        "prompt": lora_lib.LoraConfig(rank=0, targets="", method="prompt", num_virtual_tokens=3),
    },
}
CASES = [(model, method) for model in ADAPTERS for method in ADAPTERS[model]]
HF_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "bert": transformers.BertForSequenceClassification,
}


def _inputs(vocab: int):
    ids = jnp.arange(20).reshape(2, 10) % vocab
    return ids, jnp.ones_like(ids).at[1, 6:].set(0)


def _perturbed(params, seed=0):
    """Fresh adapters are no-ops (B = 0, scales 1); moved ones make a wrong mapping show."""
    rng = np.random.default_rng(seed)
    flat = lora_lib.flat_paths(params)
    for path, value in flat.items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf in ("lora_b", "prompt_embeddings"):
            flat[path] = rng.normal(0.0, 0.1, np.shape(value)).astype(np.float32)
        elif leaf in ("lora_magnitude", "ia3_scale", "ia3_input_scale"):
            flat[path] = (value * rng.uniform(0.7, 1.3, np.shape(value))).astype(np.float32)
    return lora_lib.nested(flat)


@functools.cache
def _load(name, model_dir, adapter, **overrides):
    """(config, module, host params) as the builder loads them, cached: compiling the init of
    the fresh params dominates."""
    if name == "llama":
        return load_llama(model_dir, lora=adapter, **overrides)
    return load_bert(model_dir, lora=adapter, **overrides)


def _family(name):
    return {"llama": llama.FAMILY, "bert": bert.FAMILY}[name].with_head(
        "causal_lm" if name == "llama" else "text_classification"
    )


_COMPILED: dict[int, object] = {}


def _ours(module, params, ids, mask):
    """`module`'s logits, its jitted apply compiled once per module (`_load` keeps them)."""
    apply = _COMPILED.setdefault(id(module), jax.jit(module.apply))
    return np.asarray(apply({"params": params}, ids, mask))


def _export(name, model_dir, method, tmp_path):
    """(config, module, params moved off their init, HF PEFT export dir) of a tiny model."""
    adapter = ADAPTERS[name][method]
    config, module, params = _load(name, model_dir, adapter)
    params = _perturbed(params)
    out_dir = str(tmp_path / "adapter")
    adapters.save_hf_peft(params, adapter, _family(name), config, out_dir, str(model_dir))
    return config, module, params, out_dir


def _torch_inputs(ids, mask):
    return {
        "input_ids": torch.tensor(np.asarray(ids)).long(),
        "attention_mask": torch.tensor(np.asarray(mask)).long(),
    }


@pytest.mark.parametrize("name, method", CASES)
def test_hf_peft_loads_our_adapter_with_our_logits(name, method, tmp_path, request):
    """Our model with moved adapter params against PEFT's torch modules loaded from our HF
    PEFT export: the same float32 logits."""
    model_dir = request.getfixturevalue(f"tiny_{name}_dir")
    config, module, params, out_dir = _export(name, model_dir, method, tmp_path)
    written = json.load(open(f"{out_dir}/adapter_config.json"))
    peft_type = {"dora": "LORA", "ia3": "IA3", "prompt": "PROMPT_TUNING"}[method]
    assert (written["peft_type"], written.get("use_dora")) == (
        peft_type,
        True if method == "dora" else None,
    )
    base = HF_CLASSES[name].from_pretrained(model_dir)
    model = hf_peft.PeftModel.from_pretrained(base, out_dir).eval()
    ids, mask = _inputs(config.vocab_size)
    ours = _ours(module, params, ids, mask)
    with torch.no_grad():
        theirs = model(**_torch_inputs(ids, mask)).logits.numpy()
    if name == "llama":  # PEFT keeps the virtual positions' logits; ours are the text's
        assert ours.shape == (2, 10, config.vocab_size)
        theirs = theirs[:, config.lora.num_virtual_tokens :]
        keep = np.asarray(mask, bool)  # padded positions of a causal LM are not compared
        ours, theirs = ours[keep], theirs[keep]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_merge_equals_the_adapter(method, tiny_bert_dir, tmp_path):
    """The folded kernels (and IA3's output-scaled biases) compute what the adapter does,
    in the model built without one."""
    config, module, params, _ = _export("bert", tiny_bert_dir, method, tmp_path)
    _, base_module, base = _load("bert", tiny_bert_dir, None)
    merged = lora_lib.merge(params, config.lora)
    assert jax.tree.structure(merged) == jax.tree.structure(base)
    ids, mask = _inputs(config.vocab_size)
    with_adapter = _ours(module, params, ids, mask)
    # The tiny random BERT's logits are ~0.02, so tolerances are absolute and small.
    assert np.abs(with_adapter - _ours(base_module, base, ids, mask)).max() > 1e-5  # moved
    np.testing.assert_allclose(_ours(base_module, merged, ids, mask), with_adapter, atol=1e-6)


def _peft_grads(model):
    """PEFT's adapter gradients by tensor name as its files key them (prompt tuning's as
    `prompt_embeddings`)."""
    grads = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        key = name.replace(".default", "")
        key = key.removesuffix(".weight") if "magnitude" in key or "ia3_l" in key else key
        grads["prompt_embeddings" if "prompt_encoder" in key else key] = param.grad.numpy()
    return grads


@pytest.mark.parametrize("method", ["dora", "ia3", "prompt"])
def test_gradients_equal_hf_peft(method, tiny_llama_dir, tmp_path):
    """d(loss)/d(adapter) of our model equals PEFT's, mapped to PEFT's layout by the export
    code: DoRA's norm is a constant to autodiff in both (PEFT's `detach`)."""
    config, module, params, out_dir = _export("llama", tiny_llama_dir, method, tmp_path)
    ids, mask = _inputs(config.vocab_size)
    weights = np.random.default_rng(2).normal(size=(2, 10, config.vocab_size)).astype(np.float32)
    weights *= np.asarray(mask)[..., None]  # padded positions do not count

    def loss(p):
        return jnp.sum(module.apply({"params": p}, ids, mask) * weights)

    grads = jax.jit(jax.grad(loss))(params)
    base = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir)
    # PEFT refuses to load a prompt adapter as trainable: its grads are switched on here.
    model = hf_peft.PeftModel.from_pretrained(base, out_dir, is_trainable=method != "prompt")
    if method == "prompt":
        model.prompt_encoder.default.embedding.weight.requires_grad_(True)
    logits = model(**_torch_inputs(ids, mask)).logits[:, config.lora.num_virtual_tokens :]
    (logits * torch.tensor(weights)).sum().backward()
    if method == "prompt":
        prompt = lora_lib.flat_paths(grads)["model/prompt_embeddings"]
        ours = {"prompt_embeddings": np.asarray(prompt)}
    else:
        ours = adapters.hf_adapter_tensors(grads, _family("llama").hf_param_mappings(config))
    theirs = _peft_grads(model)
    assert set(ours) == set(theirs)
    scale = max(np.abs(g).max() for g in theirs.values())
    for key, value in ours.items():
        np.testing.assert_allclose(
            value, theirs[key].reshape(value.shape), atol=1e-4 * scale, err_msg=key
        )


def test_fresh_dora_leaves_params_and_outputs_unchanged(tiny_llama_dir):
    """Loaded with m = ||W|| (computed from the loaded kernels) and B = 0, DoRA is a no-op
    and every base param is the checkpoint's. (A fresh IA3 scale is ones: exactly a no-op.)"""
    adapter = ADAPTERS["llama"]["dora"]
    config, module, params = _load("llama", tiny_llama_dir, adapter)
    _, base_module, base = _load("llama", tiny_llama_dir, None)
    flat, flat_base = lora_lib.flat_paths(params), lora_lib.flat_paths(base)
    added = set(flat) - set(flat_base)
    assert added == {p for p in flat if lora_lib.is_adapter_path(p)}
    assert {p.rsplit("/", 1)[-1] for p in added} == set(adapter.leaves)
    for path, value in flat_base.items():
        np.testing.assert_array_equal(flat[path], value, err_msg=path)
    ids, mask = _inputs(config.vocab_size)
    ours, theirs = _ours(module, params, ids, mask), _ours(base_module, base, ids, mask)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_prompt_tuning_cannot_merge():
    with pytest.raises(ValueError, match="cannot be merged.*adapter alone"):
        lora_lib.merge({}, ADAPTERS["llama"]["prompt"])


@pytest.mark.parametrize("method", ["dora", "ia3_input", "ia3_output"])
def test_adapted_layer_forms_no_weight_gradient(method):
    """The gradient of a DoRA / IA3 layer with respect to its adapter costs far less than
    the frozen kernel's would (2 * tokens * in * out FLOPs): XLA never forms dL/dW."""
    from finetune_jax.models.layers import DenseND, normal_init

    tokens, d_in, d_out = 256, 64, 64
    adapter = {
        "dora": lora_lib.LoraConfig(rank=1, targets=".*", method="dora"),
        "ia3_input": lora_lib.LoraConfig(rank=0, targets=".*", method="ia3", feedforward=".*"),
        "ia3_output": lora_lib.LoraConfig(rank=0, targets=".*", method="ia3"),
    }[method]
    layer = DenseND((d_out,), normal_init(0.02, ("embed", "mlp")), lora=adapter)
    x = jax.random.normal(jax.random.PRNGKey(0), (tokens, d_in))
    params = nn.meta.unbox(layer.init(jax.random.PRNGKey(1), x))["params"]

    def flops(wrt_kernel: bool) -> float:
        def loss(trained, frozen):
            return jnp.sum(layer.apply({"params": {**frozen, **trained}}, x) ** 2)

        trained = {k: v for k, v in params.items() if k != "kernel" or wrt_kernel}
        frozen = {k: v for k, v in params.items() if k not in trained}
        compiled = jax.jit(jax.grad(loss)).lower(trained, frozen).compile()
        cost = compiled.cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]

    weight_gradient = 2 * tokens * d_in * d_out
    assert flops(True) - flops(False) > 0.9 * weight_gradient


# ----------------------------------------------------------------------------- runs


def _method_config(model_dir, data_dir, method: str):
    config = tiny_config(model_dir, data_dir)
    config.peft.method = method
    config.peft.rank = 4 if method == "dora" else 0
    config.peft.num_virtual_tokens = 4
    config.optim.preset = "peft"  # the alias of "lora"
    config.optim.lr = 1e-2
    config.model.dropout = 0.0
    return config


@pytest.mark.parametrize("method", ["dora", "prompt"])
def test_training_moves_only_the_method_params_and_exports(
    method, tiny_bert_dir, sst2_slice, tmp_path
):
    """Two steps move the method's params and the head only (the base bitwise unchanged);
    the export of the trained params computes our logits: merged in plain transformers
    (DoRA), or as the HF PEFT adapter alone (prompt tuning, which cannot merge)."""
    from finetune_jax import export

    exp = builder.build(_method_config(tiny_bert_dir, sst2_slice, method))
    state = exp.initial_state()
    before = lora_lib.flat_paths(jax.device_get(state.params))
    batches = exp.data.train_batches()
    for _ in range(2):
        state, _ = exp.train_step(state, exp.put_batch(next(batches)))
    after = lora_lib.flat_paths(jax.device_get(state.params))
    leaves = set(lora_lib.METHOD_LEAVES[method])
    trainable = set(exp.trainable_paths)
    assert trainable == {
        p
        for p in before
        if p.rsplit("/", 1)[-1] in leaves or p.startswith(exp.family.peft_modules_to_save)
    }
    for path, value in before.items():
        assert np.array_equal(after[path], value) != (path in trainable), path
    batch = next(exp.data.eval_batches(exp.data.load("validation")))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    ours = np.asarray(jax.jit(exp.module.apply)({"params": state.params}, **inputs))
    torch_inputs = {k: torch.tensor(v).long() for k, v in inputs.items()}
    out = str(tmp_path / "hf")
    if method == "prompt":
        with pytest.raises(ValueError, match="--adapter_only"):
            export.write_hf_model(exp, state.params, out)
        export.write_hf_model(exp, state.params, out, adapter_only=True)
        base = transformers.BertForSequenceClassification.from_pretrained(tiny_bert_dir)
        model = hf_peft.PeftModel.from_pretrained(base, out)
    else:
        export.write_hf_model(exp, state.params, out)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    with torch.no_grad():
        theirs = model.eval()(**torch_inputs).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("method", ["dora", "ia3"])
def test_scanned_layers_equal_unrolled(method, tiny_llama_dir):
    """Loaded into stacked layers: the same params (DoRA's magnitudes from the stacked
    kernels), logits, merged kernels and HF PEFT tensors as unrolled. (Prompt tuning adds no
    per-layer params: its longer inputs reach stacked layers like any others.)"""
    from tests.test_scan_layers import LLAMA_STACK, assert_trees_close, restack

    adapter = ADAPTERS["llama"][method]
    config, module, params = _load("llama", tiny_llama_dir, adapter)
    scanned_config, scanned_module, scanned = _load(
        "llama", tiny_llama_dir, adapter, scan_layers=True
    )
    # A's random draws differ between the layouts; everything else is the checkpoint's.
    drop_a = lambda p: {k: v for k, v in lora_lib.flat_paths(p).items() if "lora_a" not in k}
    assert_trees_close(drop_a(scanned), drop_a(restack(params, LLAMA_STACK)), atol=1e-6)
    params = _perturbed(params)
    scanned = restack(params, LLAMA_STACK)
    ids, mask = _inputs(config.vocab_size)
    np.testing.assert_allclose(
        _ours(scanned_module, scanned, ids, mask), _ours(module, params, ids, mask), atol=1e-5
    )
    merged = lora_lib.merge(scanned, adapter)
    assert_trees_close(merged, restack(lora_lib.merge(params, adapter), LLAMA_STACK), atol=1e-6)
    family = _family("llama")
    stacked_tensors = adapters.hf_adapter_tensors(scanned, family.hf_param_mappings(scanned_config))
    unrolled_tensors = adapters.hf_adapter_tensors(params, family.hf_param_mappings(config))
    assert_trees_close(stacked_tensors, unrolled_tensors, 0)


def test_prompt_tuning_generates_with_a_kv_cache(tiny_llama_dir):
    """A prefill (cache_index 0) writes the virtual tokens into the cache's first slots;
    decode steps index past them: the cached logits equal a full forward pass's."""
    config, module, params = _load("llama", tiny_llama_dir, ADAPTERS["llama"]["prompt"])
    params = _perturbed(params)
    ids = np.arange(16).reshape(2, 8) * 7 % config.vocab_size
    prompt, steps = 6, 2
    full = _ours(module, params, ids, np.ones_like(ids))
    cache = llama.init_cache(config, 2, prompt + steps)
    assert jax.tree.leaves(cache)[0].shape[1] == prompt + steps + config.lora.num_virtual_tokens
    mask = np.ones((2, prompt + steps), np.int32)
    apply = jax.jit(module.apply, static_argnames="cache_index")
    logits, cache = apply({"params": params}, ids[:, :prompt], mask, cache=cache, cache_index=0)
    np.testing.assert_allclose(logits, full[:, :prompt], atol=1e-5)
    decode = jax.jit(
        lambda p, x, c, i: module.apply({"params": p}, x, mask, cache=c, cache_index=i)
    )
    for index in range(prompt, prompt + steps):
        logits, cache = decode(params, ids[:, index : index + 1], cache, index)
        np.testing.assert_allclose(logits[:, 0], full[:, index], atol=1e-5)


def test_prompt_tuning_with_packing_tunes_each_segment_alone(tiny_llama_dir):
    """Packed segments each see the virtual tokens (and not each other): their logits equal
    those of the examples run unpacked."""
    config, module, params = _load("llama", tiny_llama_dir, ADAPTERS["llama"]["prompt"])
    params = _perturbed(params)
    first, second = [5, 9, 13, 2, 7], [11, 3, 4, 8]
    unpacked = np.array([first, second + [0]])
    alone = _ours(module, params, unpacked, (unpacked > 0).astype(np.int32))
    packed = np.array([first + second + [0]])
    segments = np.array([[1] * 5 + [2] * 4 + [0]])
    positions = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0]])
    logits = jax.jit(module.apply)({"params": params}, packed, segments > 0, segments, positions)
    np.testing.assert_allclose(logits[0, :5], alone[0], atol=1e-5)
    np.testing.assert_allclose(logits[0, 5:9], alone[1, :4], atol=1e-5)


# ----------------------------------------------------------------------------- config


def _peft_config(**peft):
    config = tiny_config("no-such-model", "no-such-data")
    config.optim.preset = "lora"
    for key, value in peft.items():
        config.peft[key] = value
    return config


@pytest.mark.parametrize(
    "peft, message",
    [
        ({"method": "dorra", "rank": 4}, r"peft.method='dorra' is not one of.*did you mean 'dora'"),
        ({"method": "dora"}, r"peft.method='dora' needs peft.rank > 0"),
        ({"method": "prompt", "targets": ".*/kernel"}, r"peft.targets is set.*'prompt'"),
        ({"method": "ia3", "dropout": 0.1}, r"peft.dropout is set.*'ia3'"),
        ({"method": "lora", "rank": 4, "feedforward": ".*"}, r"peft.feedforward is set"),
    ],
)
def test_config_mistakes_are_errors_before_anything_loads(peft, message):
    with pytest.raises(ValueError, match=message):
        builder.build(_peft_config(**peft))  # the model and data named do not exist


def test_methods_need_the_lora_preset_and_a_family_that_serves_them():
    config = _peft_config(method="ia3")
    config.optim.preset = "full"
    with pytest.raises(ValueError, match="optim.preset='full' would train the base"):
        builder.lora_config(config)
    config.optim.preset = "peft"
    assert builder.lora_config(config).method == "ia3"
    from finetune_jax.models import vit, whisper

    with pytest.raises(ValueError, match="family 'whisper' takes no virtual tokens"):
        builder.with_family_defaults(_peft_config(method="prompt"), whisper.FAMILY)
    with pytest.raises(ValueError, match="names no default ia3 targets; set peft.targets"):
        builder.with_family_defaults(_peft_config(method="ia3"), vit.VIT_FAMILY)
    resolved = builder.with_family_defaults(_peft_config(method="ia3"), llama.FAMILY)
    assert (resolved.peft.targets, resolved.peft.feedforward) == (
        llama.FAMILY.ia3_targets,
        llama.FAMILY.ia3_feedforward,
    )


def test_adapter_params_shard_like_their_kernel():
    """Magnitudes and scales carry their kernel's logical names (size-1 dims replicated),
    the virtual tokens (`virtual_tokens`, `embed`): the default rules place them."""
    rules = list(base_config().sharding.rules)
    specs = {}
    for method in ("dora", "ia3", "prompt"):
        config = dataclasses.replace(test_llama.TINY, lora=ADAPTERS["llama"][method])
        boxed = jax.eval_shape(lambda c=config: llama.init_params(c, jax.random.PRNGKey(0)))
        for path, leaf in lora_lib.flat_paths(boxed).items():
            specs[path] = nn.logical_to_mesh_axes(leaf.names, rules)
    attention = "model/layers_0/self_attn"
    assert specs[f"{attention}/q_proj/lora_magnitude"] == P("tensor", None)  # heads, kv
    assert specs[f"{attention}/o_proj/lora_magnitude"] == P("fsdp")  # embed
    assert specs[f"{attention}/k_proj/ia3_scale"] == P(None, "tensor", None)  # 1, kv_heads, kv
    assert specs["model/layers_0/mlp/down_proj/ia3_input_scale"] == P("tensor", None)  # mlp, 1
    assert specs["model/prompt_embeddings"] == P(None, "fsdp")
