"""A CTranslate2 Whisper model directory -> an HF `WhisperForConditionalGeneration` directory.

Reads `model.bin` with plain numpy (`ctranslate2_reader`), `config.json` (suppressed tokens,
alignment heads) and `tokenizer.json` / `vocabulary.txt` of the CTranslate2 directory, and
writes config.json, generation_config.json, model.safetensors (float32: the fp16 values
upcast exactly), preprocessor_config.json and tokenizer files. What CTranslate2 changed, and
is undone here:

- self-attention q/k/v are one fused [3D, D] matrix, cross-attention k/v one [2D, D];
- the fused biases hold zeros for k: Whisper's k_proj has no bias (checked, then dropped);
- the output projection is an alias of the token embedding (HF ties `proj_out` to it);
- the encoder's sinusoid table is stored in fp16; the exact float32 sinusoids (those our
  encoder computes, and that HF's `embed_positions` holds frozen) are written instead,
  after checking the stored table is them to fp16 precision;
- tokenizer.json lacks the 1,501 timestamp tokens `<|0.00|>` ... `<|30.00|>` that end
  the vocabulary; they are added, and every id is checked against vocabulary.txt;
- `suppress_tokens` / `begin_suppress_tokens` go to generation_config.json only, as
  transformers 5 wants.

Only English-only checkpoints (`*.en`, vocabulary 51,864) are converted: a multilingual
one needs language and task maps this converter does not build.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np
import safetensors.numpy

from finetune_jax.hf import ctranslate2_reader
from finetune_jax.models import whisper

SAMPLING_RATE, HOP_LENGTH, N_FFT = 16000, 160, 400  # Whisper's log-mel front end
ENGLISH_ONLY_VOCAB = 51864
TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|> in steps of 0.02 s
POSITION_ATOL = 1e-3  # fp16 spacing near 1 is 2**-10; its rounding error is half that
GELU = 3  # ctranslate2.specs.common_spec.Activation.GELU


def _f32(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(array, np.float32))


def _layer_count(model: ctranslate2_reader.CTranslate2Model, part: str) -> int:
    found = {
        int(m.group(1)) for k in model.variables if (m := re.match(rf"{part}/layer_(\d+)/", k))
    }
    if found != set(range(len(found))) or not found:
        raise ValueError(f"CTranslate2 {part} layers are not 0..n-1: {sorted(found)}")
    return len(found)


def _check_scalars(model: ctranslate2_reader.CTranslate2Model) -> None:
    """The decoder options HF Whisper hard-codes; anything else is another architecture."""
    if model.spec != "WhisperSpec":
        raise ValueError(f"model.bin holds a {model.spec!r}, not a WhisperSpec")
    expected = {
        "decoder/pre_norm": 1,
        "decoder/scale_embeddings": 0,
        "decoder/activation": GELU,
        "decoder/alibi": 0,
        "decoder/start_from_zero_embedding": 0,
    }
    for name, value in expected.items():
        if name in model.variables and int(model.variables[name]) != value:
            raise ValueError(f"{name}={int(model.variables[name])}; HF Whisper needs {value}")
    if model.aliases.get("decoder/projection/weight") != "decoder/embeddings/weight":
        raise ValueError(
            "decoder/projection/weight is not an alias of decoder/embeddings/weight; HF "
            f"Whisper ties proj_out to the token embedding (aliases: {model.aliases})"
        )


def _linear(tensors: dict, hf: str, ct2: str, model, keep_bias: bool = True) -> None:
    tensors[f"{hf}.weight"] = _f32(model.get(f"{ct2}/weight"))
    if keep_bias:
        tensors[f"{hf}.bias"] = _f32(model.get(f"{ct2}/bias"))


def _fused(tensors: dict, hf: str, ct2: str, names: tuple[str, ...], model) -> None:
    """Splits a fused [n*D, D] projection (and bias) into HF's q/k/v_proj; k has no bias."""
    weights = np.split(_f32(model.get(f"{ct2}/weight")), len(names))
    biases = np.split(_f32(model.get(f"{ct2}/bias")), len(names))
    for name, weight, bias in zip(names, weights, biases):
        tensors[f"{hf}.{name}.weight"] = weight
        if name != "k_proj":
            tensors[f"{hf}.{name}.bias"] = bias
        elif np.any(bias):
            raise ValueError(f"{ct2}/bias has a non-zero k part; Whisper's k_proj has no bias")


def _layer_norm(tensors: dict, hf: str, ct2: str, model) -> None:
    tensors[f"{hf}.weight"] = _f32(model.get(f"{ct2}/gamma"))
    tensors[f"{hf}.bias"] = _f32(model.get(f"{ct2}/beta"))


def _layer(tensors: dict, hf: str, ct2: str, model, cross: bool) -> None:
    """One encoder (cross=False) or decoder layer."""
    _fused(
        tensors,
        f"{hf}.self_attn",
        f"{ct2}/self_attention/linear_0",
        ("q_proj", "k_proj", "v_proj"),
        model,
    )
    _linear(tensors, f"{hf}.self_attn.out_proj", f"{ct2}/self_attention/linear_1", model)
    _layer_norm(tensors, f"{hf}.self_attn_layer_norm", f"{ct2}/self_attention/layer_norm", model)
    if cross:
        _linear(tensors, f"{hf}.encoder_attn.q_proj", f"{ct2}/attention/linear_0", model)
        _fused(
            tensors, f"{hf}.encoder_attn", f"{ct2}/attention/linear_1", ("k_proj", "v_proj"), model
        )
        _linear(tensors, f"{hf}.encoder_attn.out_proj", f"{ct2}/attention/linear_2", model)
        _layer_norm(tensors, f"{hf}.encoder_attn_layer_norm", f"{ct2}/attention/layer_norm", model)
    _linear(tensors, f"{hf}.fc1", f"{ct2}/ffn/linear_0", model)
    _linear(tensors, f"{hf}.fc2", f"{ct2}/ffn/linear_1", model)
    _layer_norm(tensors, f"{hf}.final_layer_norm", f"{ct2}/ffn/layer_norm", model)


def hf_tensors(model: ctranslate2_reader.CTranslate2Model) -> dict[str, np.ndarray]:
    """HF WhisperForConditionalGeneration tensors (float32) from a CTranslate2 WhisperSpec."""
    _check_scalars(model)
    tensors: dict[str, np.ndarray] = {}
    for name in ("conv1", "conv2"):
        _linear(tensors, f"model.encoder.{name}", f"encoder/{name}", model)
    stored = _f32(model.get("encoder/position_encodings/encodings"))
    exact = whisper.sinusoids(*stored.shape)
    if np.abs(stored - exact).max() > POSITION_ATOL:
        raise ValueError(
            "encoder/position_encodings are not Whisper's sinusoids (max |diff| "
            f"{np.abs(stored - exact).max():.2e}); our encoder computes them"
        )
    tensors["model.encoder.embed_positions.weight"] = exact
    for i in range(_layer_count(model, "encoder")):
        _layer(tensors, f"model.encoder.layers.{i}", f"encoder/layer_{i}", model, cross=False)
    _layer_norm(tensors, "model.encoder.layer_norm", "encoder/layer_norm", model)
    tensors["model.decoder.embed_tokens.weight"] = _f32(model.get("decoder/embeddings/weight"))
    positions = model.get("decoder/position_encodings/encodings")
    tensors["model.decoder.embed_positions.weight"] = _f32(positions)
    for i in range(_layer_count(model, "decoder")):
        _layer(tensors, f"model.decoder.layers.{i}", f"decoder/layer_{i}", model, cross=True)
    _layer_norm(tensors, "model.decoder.layer_norm", "decoder/layer_norm", model)
    return tensors


def _tokenizer(ct2_dir: pathlib.Path, vocab_size: int):
    """The HF tokenizer of tokenizer.json plus the timestamp tokens, checked id by id
    against vocabulary.txt (CTranslate2's full vocabulary, timestamps included)."""
    import transformers  # local import: heavy, and only conversion needs it

    eot = "<|endoftext|>"
    tokenizer = transformers.WhisperTokenizer(
        tokenizer_file=str(ct2_dir / "tokenizer.json"),
        unk_token=eot,
        bos_token=eot,
        eos_token=eot,
        pad_token=eot,
        model_max_length=None,
    )
    if vocab_size - len(tokenizer) != TIMESTAMPS:
        raise ValueError(
            f"tokenizer.json has {len(tokenizer)} tokens and the model {vocab_size}: expected "
            f"exactly the {TIMESTAMPS} timestamp tokens to be missing"
        )
    tokenizer.add_tokens([f"<|{i * 0.02:.2f}|>" for i in range(TIMESTAMPS)])
    vocabulary = (ct2_dir / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    vocabulary = vocabulary[:vocab_size]
    tokens = tokenizer.convert_ids_to_tokens(list(range(vocab_size)))
    wrong = [(i, t, v) for i, (t, v) in enumerate(zip(tokens, vocabulary)) if t != v]
    if len(vocabulary) != vocab_size or wrong:
        raise ValueError(
            f"tokenizer and vocabulary.txt disagree, e.g. (id, ours, theirs) {wrong[:3]}"
        )
    return tokenizer


def _configs(model, ct2_config: dict[str, Any], tokenizer) -> tuple[Any, Any, Any]:
    """(WhisperConfig, GenerationConfig, WhisperFeatureExtractor) of the converted model."""
    import transformers

    vocab, d = model.get("decoder/embeddings/weight").shape
    if vocab != ENGLISH_ONLY_VOCAB:
        raise ValueError(
            f"vocabulary of {vocab} tokens: only English-only Whisper ({ENGLISH_ONLY_VOCAB}) "
            "is converted (a multilingual one needs language / task token maps)"
        )
    ids = {
        name: tokenizer.convert_tokens_to_ids(f"<|{name}|>")
        for name in ("endoftext", "startoftranscript", "notimestamps", "startofprev")
    }
    sources = model.get("encoder/position_encodings/encodings").shape[0]
    config = transformers.WhisperConfig(
        vocab_size=int(vocab),
        num_mel_bins=int(model.get("encoder/conv1/weight").shape[1]),
        d_model=int(d),
        encoder_layers=_layer_count(model, "encoder"),
        encoder_attention_heads=int(model.get("encoder/num_heads")),
        encoder_ffn_dim=int(model.get("encoder/layer_0/ffn/linear_0/weight").shape[0]),
        decoder_layers=_layer_count(model, "decoder"),
        decoder_attention_heads=int(model.get("decoder/num_heads")),
        decoder_ffn_dim=int(model.get("decoder/layer_0/ffn/linear_0/weight").shape[0]),
        max_source_positions=int(sources),
        max_target_positions=int(model.get("decoder/position_encodings/encodings").shape[0]),
        pad_token_id=ids["endoftext"],
        bos_token_id=ids["startoftranscript"],
        eos_token_id=ids["endoftext"],
        decoder_start_token_id=ids["startoftranscript"],
        begin_suppress_tokens=None,  # transformers 5: generation settings live in the
        suppress_tokens=None,  # generation config only
        architectures=["WhisperForConditionalGeneration"],
        dtype="float32",
    )
    generation = transformers.GenerationConfig(
        decoder_start_token_id=ids["startoftranscript"],
        bos_token_id=ids["startoftranscript"],
        eos_token_id=ids["endoftext"],
        pad_token_id=ids["endoftext"],
        max_length=config.max_target_positions,
        suppress_tokens=list(ct2_config["suppress_ids"]),
        begin_suppress_tokens=list(ct2_config["suppress_ids_begin"]),
        alignment_heads=[list(h) for h in ct2_config.get("alignment_heads", [])],
        no_timestamps_token_id=ids["notimestamps"],
        prev_sot_token_id=ids["startofprev"],
        is_multilingual=False,
        return_timestamps=False,
        max_initial_timestamp_index=50,  # openai's default: the first timestamp <= 1.0 s
    )
    features = transformers.WhisperFeatureExtractor(
        feature_size=config.num_mel_bins,
        sampling_rate=SAMPLING_RATE,
        hop_length=HOP_LENGTH,
        n_fft=N_FFT,
        chunk_length=2 * sources * HOP_LENGTH // SAMPLING_RATE,
    )
    return config, generation, features


def convert(ct2_dir: str | os.PathLike, out_dir: str | os.PathLike) -> pathlib.Path:
    """Writes the HF directory for the CTranslate2 Whisper directory `ct2_dir`; returns it."""
    ct2_dir, out_dir = pathlib.Path(ct2_dir), pathlib.Path(out_dir)
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        if not (ct2_dir / name).is_file():
            raise FileNotFoundError(f"{ct2_dir} has no {name}: not a CTranslate2 Whisper directory")
    model = ctranslate2_reader.read_model_bin(ct2_dir / "model.bin")
    tensors = hf_tensors(model)
    vocab_size = model.get("decoder/embeddings/weight").shape[0]
    tokenizer = _tokenizer(ct2_dir, vocab_size)
    ct2_config = json.loads((ct2_dir / "config.json").read_text())
    config, generation, features = _configs(model, ct2_config, tokenizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    # transformers refuses safetensors files without a known "format" in their metadata.
    safetensors.numpy.save_file(tensors, out_dir / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    generation.save_pretrained(out_dir)
    features.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
