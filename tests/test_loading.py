"""Streaming a checkpoint into params: tensor by tensor from sharded bf16 safetensors, equal to
converting the whole file at once; storage dtypes; one tensor in flight at a time."""

from __future__ import annotations

import gc
import weakref

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from finetune_jax.hf import loading, model_files
from finetune_jax.models import hf_mapping, llama
from finetune_jax.models import lora as lora_lib


@pytest.fixture(scope="module")
def sharded_bf16_llama(tmp_path_factory, tiny_llama_dir):
    """The tiny random Llama saved again as bf16 safetensors in several shards with an index."""
    out = tmp_path_factory.mktemp("sharded_llama")
    model = transformers.LlamaForCausalLM.from_pretrained(tiny_llama_dir).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="40KB")
    assert (out / model_files.INDEX_FILE).exists() and len(list(out.glob("*.safetensors"))) > 3
    return out


def _config(model_dir, **overrides):
    return llama.LlamaConfig.from_hf(model_files.read_hf_config(model_dir), **overrides)


def test_streamed_params_equal_the_whole_checkpoint_converted(sharded_bf16_llama):
    config = _config(sharded_bf16_llama)
    reference, _ = hf_mapping.params_from_hf(
        model_files.read_safetensors(sharded_bf16_llama), llama.FAMILY, config
    )
    streamed = jax.device_get(loading.load_params(llama.FAMILY, config, str(sharded_bf16_llama)))
    assert jax.tree.structure(streamed) == jax.tree.structure(reference)
    for x, y in zip(jax.tree.leaves(streamed), jax.tree.leaves(reference)):
        assert x.dtype == np.float32 and np.array_equal(x, y)


def test_param_dtype_bfloat16_stores_every_param_in_bfloat16(sharded_bf16_llama):
    lora = lora_lib.LoraConfig(rank=2, targets=".*/q_proj/kernel")
    config = _config(sharded_bf16_llama, param_dtype="bfloat16", lora=lora)
    params = jax.device_get(loading.load_params(llama.FAMILY, config, str(sharded_bf16_llama)))
    flat = lora_lib.flat_paths(params)
    assert {x.dtype for x in flat.values()} == {np.dtype(ml_dtypes.bfloat16)}
    assert any(lora_lib.is_adapter_path(p) for p in flat)  # fresh params are bf16 too
    # The checkpoint is bf16, so its values arrive unchanged.
    reference = lora_lib.flat_paths(
        jax.device_get(
            loading.load_params(llama.FAMILY, _config(sharded_bf16_llama), str(sharded_bf16_llama))
        )
    )
    for path, value in reference.items():
        np.testing.assert_array_equal(flat[path].astype(np.float32), value, err_msg=path)


def test_one_checkpoint_tensor_in_flight_at_a_time(sharded_bf16_llama, monkeypatch):
    """Each tensor read is released before the next is read: a process holds its shards
    plus at most one checkpoint tensor, never the whole file."""
    real_get, alive, reads = model_files.SafetensorsTensors.get, [], []

    def get(self, name):
        gc.collect()
        assert not [r for r in alive if r() is not None], (
            f"a tensor is still held when reading {name}"
        )
        array = real_get(self, name)
        alive.append(weakref.ref(array))
        reads.append(name)
        return array

    monkeypatch.setattr(model_files.SafetensorsTensors, "get", get)
    monkeypatch.setattr(model_files, "read_safetensors", lambda _: pytest.fail("read all at once"))
    config = _config(sharded_bf16_llama)
    loading.load_params(llama.FAMILY, config, str(sharded_bf16_llama))
    assert sorted(reads) == sorted(m.hf_key for m in llama.FAMILY.hf_param_mappings(config))
