"""tools/preflight.py: a weights-free compile of the real GLUE and SFT configs' train steps,
with the task's own batch, per-device bytes and a fits / does-not-fit verdict."""

from __future__ import annotations

import importlib.util
import json

import pytest

from configs.glue.sst2_minilm import get_config as glue_config
from configs.sft.smollm2_gsm8k_lora import get_config as sft_config
from finetune_jax.data import loaders, text_sources
from finetune_jax.hf import model_files
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
        (loaders.ChatData, "load"),
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
