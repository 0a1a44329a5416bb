"""tools/preflight.py: a weights-free compile of the real GLUE and SFT configs' train steps,
with the task's own batch, per-device bytes and a fits / does-not-fit verdict."""

from __future__ import annotations

import importlib.util
import json

import jax
import pytest

from configs.glue.sst2_minilm import get_config as glue_config
from configs.sft.smollm2_gsm8k_lora import get_config as sft_config
from finetune_jax.data import chat_loader, text_sources
from finetune_jax.hf import model_files
from finetune_jax.training import builder
from tests.helpers import REPO

spec = importlib.util.spec_from_file_location("preflight", REPO / "tools" / "preflight.py")
preflight = importlib.util.module_from_spec(spec)
spec.loader.exec_module(preflight)


@pytest.fixture
def nothing_read(monkeypatch):
    """Fail on any read of weights, tokenizer or data."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"preflight read files: {args}")

    for module, name in (
        (model_files, "open_tensors"),
        (model_files, "read_safetensors"),
        (model_files, "load_tokenizer"),
        (text_sources, "load_split"),
        (chat_loader.ChatData, "load"),
    ):
        monkeypatch.setattr(module, name, refuse)


def test_glue_config_preflight(minilm_dir, nothing_read):
    config = glue_config()
    hf_config = preflight.read_model_config(str(minilm_dir / "config.json"))
    result = preflight.preflight(config, hf_config, device_memory=2**40)
    assert result["batch_shape"] == [config.train.batch_size, max(config.data.buckets)]
    params = result["trainable_params"] + result["frozen_params"]
    assert result["params_bytes_per_device"] == 4 * params  # float32, one device
    assert result["opt_state_bytes_per_device"] >= 2 * 4 * params  # Adam's mu and nu
    assert result["temp_bytes_per_device"] > 0 and result["flops_per_step_per_device"] > 0
    assert result["verdict"] == "fits"
    small = preflight.preflight(config, hf_config, device_memory=result["params_bytes_per_device"])
    assert small["verdict"] == "does not fit"


def test_sft_config_preflight_with_packed_batch_and_bf16(tiny_chat_llama_dir, nothing_read):
    config = sft_config()
    config.model.param_dtype = "bfloat16"
    hf_config = preflight.read_model_config(str(tiny_chat_llama_dir))
    result = preflight.preflight(config, hf_config)
    assert result["batch_shape"] == [config.train.batch_size, config.data.max_length]
    params = result["trainable_params"] + result["frozen_params"]
    assert result["params_bytes_per_device"] == 2 * params  # bfloat16
    assert 0 < result["opt_state_bytes_per_device"] < 4 * params  # LoRA leaves only
    assert "verdict" not in result  # no --device_memory given


def test_device_memory_parsing():
    assert preflight.parse_bytes("80GiB") == 80 * 2**30
    assert preflight.parse_bytes("16GB") == 16 * 10**9
    assert preflight.parse_bytes("") is None
    with pytest.raises(ValueError, match="device_memory"):
        preflight.parse_bytes("lots")


def test_model_config_json_is_read_without_weights(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert preflight.read_model_config(str(path))["hidden_size"] == 64


def test_scanned_bf16_step_converts_one_layer_at_a_time(monkeypatch, nothing_read):
    """XLA:CPU computes bf16 dots in f32; left to itself it hoists that conversion out of the
    layer loop, making an f32 copy of every layer's weights at once. The scanned steps are
    compiled without that hoisting (builder.SCANNED_STEP_OPTIONS): temp memory drops by about
    that copy, all but one layer of it."""
    layers, hidden, mlp = 4, 256, 1024
    hf_config = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=mlp,
        vocab_size=4096,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        bos_token_id=1,
        eos_token_id=2,
    )
    config = sft_config()
    config.optim.preset, config.peft.rank = "full", 0
    config.model.param_dtype = config.optim.state_dtype = "bfloat16"
    config.train.batch_size, config.data.max_length = 2, 128
    assert config.model.scan_layers
    temp = lambda: preflight.preflight(config, hf_config)["temp_bytes_per_device"]
    with_options = temp()
    monkeypatch.setattr(builder, "SCANNED_STEP_OPTIONS", None)
    hoisted = temp()
    per_layer = hidden * (2 * hidden + 2 * hidden // 2) + 3 * hidden * mlp  # q,o + k,v + MLP
    assert hoisted - with_options >= 4 * per_layer * (layers - 1)


def test_scanned_step_flops_count_every_layer(tiny_chat_llama_dir, nothing_read):
    """XLA's cost analysis counts a while loop's body once: a scanned step's compiled count
    is about one layer's. Preflight (tools/step_flops.py) reports what the unrolled step
    costs, within a few percent of the unrolled program's own compiled count."""
    config = sft_config()
    config.optim.preset, config.peft.rank = "full", 0
    config.train.batch_size, config.data.max_length = 2, 64
    hf_config = preflight.read_model_config(str(tiny_chat_llama_dir))
    # Layers that outweigh the LM head: 12 of them with a wide MLP.
    hf_config = dict(hf_config, num_hidden_layers=12, intermediate_size=2048)
    assert config.model.scan_layers
    scanned = preflight.preflight(config, hf_config)["flops_per_step_per_device"]
    setup = builder.build(config, hf_config=hf_config)
    spec = setup.kind.batch_spec(config, setup.task)
    batch = {name: jax.ShapeDtypeStruct(*shape_dtype) for name, shape_dtype in spec.items()}
    compiled = setup.train_step.lower(setup.abstract_state(), batch).compile().cost_analysis()
    config.model.scan_layers = False
    unrolled = preflight.preflight(config, hf_config)["flops_per_step_per_device"]
    assert scanned == pytest.approx(unrolled, rel=0.05)
    assert compiled["flops"] < 0.5 * unrolled  # what was reported before
