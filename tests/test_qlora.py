"""QLoRA (`peft.quantize`): NF4 equals bitsandbytes' `quantize_4bit` (double-quantized absmax
included) and both formats round-trip within their bounds; a quantized tiny Llama computes what
transformers computes with the dequantized weights (plus the merged adapter), scanned as
unrolled; the loader quantizes each checkpoint tensor as it arrives; a QLoRA run trains only its
adapters (the quantized leaves bitwise unchanged) and its merged export loads in transformers
with our logits; config mistakes and a rule training a quantized leaf are errors naming them."""

from __future__ import annotations

import dataclasses
import functools
import gc
import json
import tracemalloc
import weakref

import flax.linen as nn
import gguf
import jax
import numpy as np
import pytest
import torch
import transformers

from finetune_jax.hf import model_files
from finetune_jax.models import hf_mapping, llama, marian, quantization, vit, whisper
from finetune_jax.models import lora as lora_lib
from finetune_jax.training import builder, optim
from tests import test_marian, test_vit, test_whisper
from tests.helpers import load_llama, tiny_config
from tests.test_scan_layers import LLAMA_STACK, restack
from tests.test_sft_train import tiny_sft_config

TARGETS = llama.FAMILY.quantize_targets  # every attention and MLP projection


# The adapter methods on a quantized base: LoRA and DoRA on three projections, IA3 on its
# HF PEFT targets (down_proj scaled on its input).
ADAPTERS = {
    "lora": dict(rank=4, alpha=8.0, targets=r".*/(q_proj|o_proj|down_proj)/kernel"),
    "dora": dict(rank=4, alpha=8.0, targets=r".*/(q_proj|o_proj|down_proj)/kernel"),
    "ia3": dict(
        rank=0, targets=r".*/(k_proj|v_proj|down_proj)/kernel", feedforward=r".*/down_proj/kernel"
    ),
}


def _adapter(method: str, adapter: str = "lora") -> lora_lib.LoraConfig:
    return lora_lib.LoraConfig(
        **ADAPTERS[adapter], method=adapter, quantize=method, quantize_targets=TARGETS
    )


# ----------------------------------------------------------------------------- formats

# A Linear [384 <- 256], a split-head o_proj [4, 16, 64] and a kernel whose input (40) is
# not a whole number of 64-weight blocks.
SHAPES = [((256, 384), 1), ((4, 16, 64), 2), ((40, 24), 1)]


def _kernel(shape, seed=0):
    return (np.random.default_rng(seed).standard_t(5, size=shape) * 0.02).astype(np.float32)


def _to_torch(kernel, in_axes):
    """Our kernel [*in, *out] as the torch Linear weight [out, in] it is the transpose of."""
    n_in = int(np.prod(kernel.shape[:in_axes]))
    return torch.tensor(np.ascontiguousarray(kernel.reshape(n_in, -1).T))


def test_nf4_equals_bitsandbytes_quantize_4bit():
    """Every 4-bit code equals bitsandbytes' (blocks of 64 along a torch weight's rows, NF4
    table, high nibble first); the double-quantized absmaxes equal its 8-bit codes bar
    near-ties one step apart; the dequantized kernels agree to that step."""
    bnb = pytest.importorskip("bitsandbytes.functional")
    for shape, in_axes in SHAPES[:2]:
        kernel = _kernel(shape)
        ours = quantization.quantize("nf4", kernel, in_axes)
        packed, state = bnb.quantize_4bit(
            _to_torch(kernel, in_axes), blocksize=64, quant_type="nf4", compress_statistics=True
        )
        codes, absmax = ours["kernel_nf4"], ours["kernel_nf4_absmax"]
        # bitsandbytes' order: output feature major, then the input dims.
        np.testing.assert_array_equal(
            codes.reshape(-1, shape[-1]).T.reshape(-1), packed.numpy().ravel()
        )
        theirs_absmax = state.absmax.numpy()
        ours_absmax = absmax.reshape(absmax.shape[0], -1).T.reshape(-1)
        differ = ours_absmax != theirs_absmax
        assert differ.mean() < 0.005
        assert np.all(np.abs(ours_absmax[differ].astype(int) - theirs_absmax[differ]) == 1)
        np.testing.assert_allclose(
            ours["kernel_nf4_absmax_scale"], state.state2.absmax.numpy(), rtol=1e-6
        )
        np.testing.assert_allclose(ours["kernel_nf4_absmax_offset"], state.offset.item(), rtol=1e-6)
        dense = np.asarray(quantization.dequantize("nf4", ours))
        theirs = bnb.dequantize_4bit(packed, state).numpy().T.reshape(shape)
        step = (
            np.abs(np.diff(quantization.DYNAMIC_VALUES)).max()
            * ours["kernel_nf4_absmax_scale"].max()
        )
        np.testing.assert_allclose(dense, theirs, atol=step, rtol=0)
        if not differ.any():
            np.testing.assert_allclose(dense, theirs, atol=1e-7)


def _reference_nf4(kernel, in_axes):
    """NF4 from the paper's definition: per output feature, blocks of 64 consecutive weights
    of the flattened input (zero-padded), each scaled by its absmax and rounded to the nearest
    NF4 value. Returns (codes [n_in, n_out], absmax [blocks, n_out])."""
    n_in = int(np.prod(kernel.shape[:in_axes]))
    flat = kernel.reshape(n_in, -1).astype(np.float64)
    blocks = -(-n_in // 64)
    padded = np.zeros((blocks * 64, flat.shape[1]))
    padded[:n_in] = flat
    absmax = np.abs(padded.reshape(blocks, 64, -1)).max(axis=1)
    scaled = padded.reshape(blocks, 64, -1) / absmax[:, None, :]
    codes = np.abs(scaled[..., None] - quantization.NF4_VALUES).argmin(axis=-1)
    return codes.reshape(blocks * 64, -1)[:n_in], absmax


@pytest.mark.parametrize("shape, in_axes", SHAPES)
def test_round_trips_stay_within_the_formats_bounds(shape, in_axes):
    """NF4: the nearest of the 16 values (the numpy reference's codes), each weight within half
    the widest NF4 gap of its block's absmax, plus what the 8-bit absmax lost (at most half a
    dynamic-map step of its group's scale). int8: within half a step of its feature's scale.
    Q4_1: within half a step (plus the f16 rounding of scale and minimum), and equal to
    llama.cpp's own blocks (`gguf.quants`) where the runs are the same."""
    kernel = _kernel(shape, seed=1)
    leaves = quantization.quantize("nf4", kernel, in_axes)
    codes, absmax = _reference_nf4(kernel, in_axes)
    packed = leaves["kernel_nf4"].reshape(-1, codes.shape[1])
    ours = np.stack([packed >> 4, packed & 15], axis=1).reshape(codes.shape)
    np.testing.assert_array_equal(ours, codes)
    dense = np.asarray(quantization.dequantize("nf4", leaves)).reshape(codes.shape)
    scale = leaves["kernel_nf4_absmax_scale"].max()
    absmax_error = 0.5 * np.diff(quantization.DYNAMIC_VALUES).max() * scale
    half_gap = 0.5 * np.diff(quantization.NF4_VALUES).max()
    bound = np.repeat(absmax * half_gap + absmax_error, 64, axis=0)[: codes.shape[0]]
    assert np.all(np.abs(dense - kernel.reshape(codes.shape)) <= bound + 1e-7)
    int8 = quantization.quantize("int8", kernel, in_axes)
    dense = np.asarray(quantization.dequantize("int8", int8))
    assert int8["kernel_int8"].dtype == np.int8 and int8["kernel_int8_scale"].shape == (
        *(1,) * in_axes,
        *shape[in_axes:],
    )
    assert np.all(np.abs(dense - kernel) <= int8["kernel_int8_scale"] * (0.5 + 1e-6))
    q4_1 = quantization.quantize("q4_1", kernel, in_axes)
    dense = np.asarray(quantization.dequantize("q4_1", q4_1))
    step = np.repeat(q4_1["kernel_q4_1_scale"].astype(np.float32), 32, axis=in_axes - 1)
    step = np.take(step, np.arange(shape[in_axes - 1]), axis=in_axes - 1)
    assert np.all(np.abs(dense - kernel) <= 0.5 * step + 2e-3 * np.abs(kernel).max())
    if shape[in_axes - 1] % 32 == 0 and in_axes == 1:  # llama.cpp's own blocks: the same
        raw = gguf.quants.quantize(
            _to_torch(kernel, in_axes).numpy(), gguf.GGMLQuantizationType.Q4_1
        )
        theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_1)
        np.testing.assert_array_equal(dense, theirs.T)
    assert quantization.bits_per_weight("nf4", (4096, 4096), 1) == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize("method", ["nf4", "int8", "q4_1"])
def test_host_quantization_in_chunks_equals_it_whole_and_bounds_its_temporaries(
    method, monkeypatch
):
    """On the host the output features are quantized a chunk at a time: the leaves equal the
    whole kernel's at once for every shape, and the memory numpy takes beyond the input
    stays near the outputs' size (~17 bytes per weight for NF4 at once)."""
    whole = {}
    for chunk in (1 << 30, 1000):
        monkeypatch.setattr(quantization, "HOST_CHUNK_WEIGHTS", chunk)
        for shape, in_axes in SHAPES:
            kernel = _kernel(shape, seed=2)
            whole.setdefault(shape, quantization.quantize(method, kernel, in_axes))
            chunked = quantization.quantize(method, kernel, in_axes)
            assert chunked.keys() == whole[shape].keys()
            for name, leaf in whole[shape].items():
                np.testing.assert_array_equal(chunked[name], leaf, err_msg=name)
    monkeypatch.setattr(quantization, "HOST_CHUNK_WEIGHTS", 1 << 18)
    kernel = _kernel((512, 8192), seed=3)  # 16 chunks
    tracemalloc.start()
    try:
        quantization.quantize(method, kernel, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak / kernel.size < 3.0  # bytes per weight


# ----------------------------------------------------------------------------- models


@functools.cache
def _load(model_dir, method, adapter="lora", **overrides):
    return load_llama(model_dir, lora=_adapter(method, adapter), **overrides)


@functools.cache
def _apply(module):
    return jax.jit(module.apply)  # compiled once per module (`_load` keeps them)


def _logits(module, params, ids):
    return np.asarray(_apply(module)({"params": params}, ids))


def _moved(params, seed=0):
    """Adapters moved off their no-op start (LoRA's B = 0, DoRA's magnitude = the base's norm,
    IA3's scales 1), so a wrongly merged adapter shows."""
    rng, flat = np.random.default_rng(seed), lora_lib.flat_paths(params)
    for path, value in flat.items():
        leaf = path.rsplit("/", 1)[-1]
        if leaf == "lora_b":
            flat[path] = rng.normal(0.0, 0.05, value.shape).astype(np.float32)
        elif leaf in ("lora_magnitude", "ia3_scale", "ia3_input_scale"):
            flat[path] = (value * rng.uniform(0.7, 1.3, value.shape)).astype(np.float32)
    return lora_lib.nested(flat)


@pytest.mark.parametrize(
    "method, adapter", [("nf4", "lora"), ("int8", "lora"), ("nf4", "dora"), ("nf4", "ia3")]
)
def test_logits_equal_transformers_with_the_dequantized_weights(method, adapter, tiny_llama_dir):
    """Our QLoRA model against transformers' Llama holding the merged export's tensors (the
    dequantized base + the adapter merged in: LoRA's delta, DoRA's rescaled direction, IA3's
    scales, as HF PEFT merges into a bitsandbytes base): float32 logits within 1e-4; only
    the projections are quantized (embeddings, norms, LM head float)."""
    config, module, params = _load(tiny_llama_dir, method, adapter)
    params = _moved(params)
    flat = lora_lib.flat_paths(params)
    codes = quantization.LEAVES[method][0]
    assert {p.rsplit("/", 2)[1] for p in flat if p.endswith(codes)} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }  # fmt: skip
    assert not any(p.endswith("/kernel") and "layers_" in p for p in flat)
    assert flat["lm_head/kernel"].dtype == np.float32
    tensors = hf_mapping.params_to_hf(lora_lib.merge(params, config.lora), llama.FAMILY, config)
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir).eval()
    model.load_state_dict({k: torch.tensor(v) for k, v in tensors.items()})
    ids = np.arange(20).reshape(2, 10) * 7 % config.vocab_size
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(module, params, ids), theirs, atol=1e-4)


def test_streamed_quantization_one_tensor_at_a_time_scanned_as_unrolled(
    tiny_llama_dir, monkeypatch
):
    """Scanned layers load each checkpoint tensor alone and quantize it on the host before the
    next is read (no float copy of a quantized kernel is ever placed); each layer's leaves equal
    the unrolled layout's bitwise, and so do the logits."""
    real_get, real_quantize = model_files.SafetensorsTensors.get, quantization.quantize
    alive, quantized = [], []

    def get(self, name):
        gc.collect()
        assert not [r for r in alive if r() is not None], f"a tensor is held reading {name}"
        array = real_get(self, name)
        alive.append(weakref.ref(array))
        return array

    def quantize(method, kernel, in_axes, xp=np):
        if xp is np:  # on the host (not the traced init of the other params)
            quantized.append(kernel.shape)
        return real_quantize(method, kernel, in_axes, xp)

    monkeypatch.setattr(model_files.SafetensorsTensors, "get", get)
    monkeypatch.setattr(quantization, "quantize", quantize)
    config, module, scanned = load_llama(tiny_llama_dir, lora=_adapter("nf4"), scan_layers=True)
    monkeypatch.undo()
    rows = [m for m in llama.FAMILY.hf_param_mappings(config) if "_proj/" in m.path]
    assert sorted(quantized) == sorted(m.shape for m in rows)  # one call per layer's kernel
    stored = lora_lib.flat_paths(scanned)
    assert stored["model/layers/self_attn/q_proj/kernel_nf4"].dtype == np.uint8
    assert not [p for p in stored if p.endswith("_proj/kernel")]
    _, unrolled_module, unrolled = _load(tiny_llama_dir, "nf4")
    restacked = lora_lib.flat_paths(restack(unrolled, LLAMA_STACK))
    for path, value in stored.items():
        if "lora_a" not in path:  # A's random draws differ between the layouts
            np.testing.assert_array_equal(value, restacked[path], err_msg=path)
    moved = _moved(unrolled)
    ids = np.arange(20).reshape(2, 10) % config.vocab_size
    np.testing.assert_allclose(
        _logits(module, restack(moved, LLAMA_STACK), ids),
        _logits(unrolled_module, moved, ids),
        atol=1e-5,
    )


def test_a_q4_1_gguf_loads_its_own_blocks(tiny_llama_dir, tmp_path, monkeypatch):
    """A GGUF whose projections are Q4_1 (as the packaged SmolLM2's) loads under
    peft.quantize=q4_1 without quantizing anything: its blocks become the leaves as they are,
    so the model computes what the float model dequantized from the file does. (o_proj, whose
    16-wide heads the file's 32-weight runs straddle, is left float here.)"""
    from tests.test_gguf_reader import _write_gguf

    path = _write_gguf(
        tmp_path / "q4_1.gguf",
        model_files.read_hf_config(tiny_llama_dir),
        model_files.read_safetensors(tiny_llama_dir),
        q4_1=True,
    )
    adapter = lora_lib.LoraConfig(
        rank=4,
        targets=r".*/q_proj/kernel",
        quantize="q4_1",
        quantize_targets=r".*/((q|k|v)_proj|mlp/\w+_proj)/kernel",
    )
    real_quantize = quantization.quantize

    def quantize(method, kernel, in_axes, xp=np):
        assert xp is not np, "a kernel was quantized on the host, not kept"
        return real_quantize(method, kernel, in_axes, xp)  # the traced init of the others

    monkeypatch.setattr(quantization, "quantize", quantize)
    config, module, kept = load_llama(path, lora=adapter)
    monkeypatch.undo()
    flat = lora_lib.flat_paths(kept)
    assert flat["model/layers_0/mlp/down_proj/kernel_q4_1_scale"].dtype == np.float16
    _, float_module, dense = load_llama(path)
    ids = np.arange(20).reshape(2, 10) * 7 % config.vocab_size
    np.testing.assert_allclose(
        _logits(module, kept, ids), _logits(float_module, dense, ids), atol=1e-5
    )


# ----------------------------------------------------------------------------- runs


def test_qlora_trains_only_its_adapters_and_exports_merged(tiny_chat_llama_dir, tmp_path):
    """Steps on one batch lower the loss; only LoRA's A and B move (the NF4 leaves bitwise
    unchanged, holding no optimizer state); the merged export loads in transformers with our
    logits, and the adapter is written in HF PEFT's format beside it."""
    from finetune_jax import export

    config = tiny_sft_config(tiny_chat_llama_dir)
    config.peft.quantize = "nf4"
    exp = builder.build(config)
    state = exp.initial_state()
    before = lora_lib.flat_paths(jax.device_get(state.params))
    batch = exp.put_batch(next(exp.data.train_batches()))
    losses = []
    for _ in range(2):
        state, metrics = exp.train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    after = lora_lib.flat_paths(jax.device_get(state.params))
    assert set(exp.trainable_paths) == {p for p in before if lora_lib.is_adapter_path(p)}
    assert any(p.endswith("kernel_nf4") for p in before)
    for path, value in before.items():
        assert np.array_equal(after[path], value) != lora_lib.is_adapter_path(path), path
    assert not any(
        "kernel_nf4" in str(p) for p, _ in jax.tree_util.tree_leaves_with_path(state.opt_state)
    )
    out = tmp_path / "hf"
    export.write_hf_model(exp, state.params, str(out))
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    ids = np.asarray(batch["input_ids"])[:1, :24]
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(_logits(exp.module, state.params, ids), theirs, atol=1e-4)


def test_bert_quantizes_every_encoder_projection_by_default(tiny_bert_dir, sst2_slice):
    """`peft.quantize_targets='auto'` on BERT: the attention and FFN projections of every
    encoder layer, not the embeddings, pooler or classifier."""
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.peft.rank, config.optim.preset, config.peft.quantize = 4, "lora", "nf4"
    paths = lora_lib.flat_paths(builder.build(config).abstract_params)
    quantized = {p.rpartition("/")[0] for p in paths if p.endswith("/kernel_nf4")}
    layers = {p.split("/")[2] for p in paths if "/layer_" in p}
    names = ("attention/query", "attention/key", "attention/value", "attention/output")
    names += ("intermediate", "output")
    assert quantized == {f"bert/encoder/{layer}/{name}" for layer in layers for name in names}
    assert "bert/pooler/dense/kernel" in paths and "classifier/kernel" in paths


def _family_case(name):
    """(family, tiny config, init, module class, inputs, quantized kernels per model) of the
    families besides Llama and BERT."""
    if name == "dinov2":
        config = test_vit.TINY["dinov2"]
        inputs = (test_vit._nhwc(test_vit._pixels(28, 28)),)
        count = 6 * config.num_hidden_layers
        return (
            vit.DINOV2_FAMILY,
            config,
            vit.init_params,
            vit.ViTForImageClassification,
            inputs,
            count,
        )
    if name == "whisper":
        config = test_whisper.ONE_LAYER
        inputs = test_whisper._inputs()[:2]
        count = 6 * config.encoder_layers + 10 * config.decoder_layers
        return (
            whisper.FAMILY,
            config,
            whisper.init_params,
            whisper.WhisperForConditionalGeneration,
            inputs,
            count,
        )
    config = test_marian.TINY_SSRU  # the SSRU cell's own projections stay float
    count = 6 * config.encoder_layers + 6 * config.decoder_layers
    module = marian.MarianMTModel
    return marian.FAMILY, config, marian.init_params, module, test_marian._inputs(), count


@pytest.mark.parametrize("name", ["dinov2", "whisper", "marian"])
def test_the_other_families_quantize_their_projections_by_default(name):
    """ViT / DINOv2, Whisper and Marian: `peft.quantize_targets='auto'` stores every attention
    and MLP projection of their layers in NF4, and the quantized model (with a LoRA moved off
    zero on the same kernels) computes what the plain model computes with the merge of its
    dequantized kernels and adapters."""
    family, config, init, module, inputs, count = _family_case(name)
    adapter = lora_lib.LoraConfig(
        rank=2,
        targets=family.quantize_targets,
        quantize="nf4",
        quantize_targets=family.quantize_targets,
    )
    quantized_config = dataclasses.replace(config, lora=adapter)
    params = _moved(nn.meta.unbox(init(quantized_config, jax.random.PRNGKey(0))))
    assert sum(p.endswith("/kernel_nf4") for p in lora_lib.flat_paths(params)) == count
    ours = jax.jit(module(quantized_config).apply)({"params": params}, *inputs)
    merged = lora_lib.merge(params, adapter)
    plain = jax.jit(module(dataclasses.replace(config, lora=None)).apply)(
        {"params": merged}, *inputs
    )
    np.testing.assert_allclose(np.asarray(ours), np.asarray(plain), atol=1e-5)


def test_a_rule_training_a_quantized_leaf_is_an_error_naming_it(tiny_chat_llama_dir):
    """...and the counts the run prints see the weights a quantized kernel stores."""
    hf_config = model_files.read_config(tiny_chat_llama_dir)
    counts = {}
    for method in ("none", "nf4"):
        config = tiny_sft_config(tiny_chat_llama_dir, **{"peft.quantize": method})
        setup = builder.build(config, hf_config=hf_config)
        counts[method] = optim.param_counts(setup.groups, setup.abstract_params)
    assert counts["nf4"] == counts["none"]
    config.peft.quantize_targets = r".*/no_such_proj/kernel"
    with pytest.raises(ValueError, match="quantize_targets=.*matches no kernel of this model"):
        builder.build(config, hf_config=hf_config)
    config.peft.quantize_targets = "auto"
    config.peft.quantize = "int8"
    config.optim.preset = "rules"
    for leaf, dtype in (("kernel_int8", "int8"), ("kernel_int8_scale", "float32")):
        config.optim.rules = (
            (".*/lora_.*", "trainable"),
            (f".*/{leaf}", "trainable"),
            (".*", "frozen"),
        )
        with pytest.raises(
            ValueError, match=rf"would train 'model/layers_0/\w+/\w+/{leaf}' \({dtype}\)"
        ):
            builder.build(config, hf_config=hf_config)


@pytest.mark.parametrize(
    "peft, message",
    [
        (
            {"quantize": "nf5"},
            r"peft.quantize='nf5' is not one of none, nf4, int8, q4_1; did you mean 'nf4'",
        ),
        ({"quantize": "nf4", "rank": 0}, r"peft.quantize='nf4' .* no adapter is on"),
        ({"quantize_targets": ".*"}, r"peft.quantize_targets is set, but peft.quantize='none'"),
    ],
)
def test_config_mistakes_are_errors_naming_the_key(peft, message, tiny_chat_llama_dir):
    config = tiny_sft_config(tiny_chat_llama_dir)
    for key, value in peft.items():
        config.peft[key] = value
    with pytest.raises(ValueError, match=message):
        builder.lora_config(config)


def test_a_qlora_run_checkpoints_its_adapters_only_and_resumes_bitwise(
    tiny_chat_llama_dir, tmp_path
):
    """The quantized leaves are frozen, so slim checkpoints leave them out; a resume streams
    and quantizes the base again, to the same leaves, and goes on bitwise."""
    from finetune_jax.train import train
    from tests.helpers import final_state, train_losses
    from tests.test_slim_checkpoints import _saved_params

    config = tiny_sft_config(tiny_chat_llama_dir)
    config.peft.quantize = "nf4"
    config.train.max_steps, config.train.checkpoint_every = 4, 2
    train(config, str(tmp_path / "straight"))
    train(config, str(tmp_path / "resumed"), until_step=2)
    saved, _ = _saved_params(tmp_path / "resumed", 2)
    assert saved and all(lora_lib.is_adapter_path(p) for p in saved), sorted(saved)
    train(config, str(tmp_path / "resumed"))
    a, b = final_state(config, tmp_path / "straight"), final_state(config, tmp_path / "resumed")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.array_equal(x, y)
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "resumed")
    # The final eval runs on the base the resume streamed and quantized again.
    summaries = [
        json.loads((tmp_path / r / "summary.json").read_text()) for r in ("straight", "resumed")
    ]
    assert summaries[0]["best"] == summaries[1]["best"]
