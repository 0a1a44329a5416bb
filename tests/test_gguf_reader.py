"""GGUF reading: names, llama.cpp's q/k permutation, config, errors; SmolLM2 parity with
transformers' own GGUF loader (tensors exactly, logits and greedy tokens)."""

from __future__ import annotations

import time

import gguf
import jax
import numpy as np
import pytest

from finetune_jax.hf import gguf_reader, model_files
from finetune_jax.models import llama
from tests.helpers import load_llama


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's `LlamaModel.permute` (HF -> GGUF row order)."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_gguf(path, hf_config, tensors, arch="llama", permute=True, q4_1=False):
    """Writes HF tensors as a GGUF file the way llama.cpp's converter names and orders them
    (with `q4_1`, the projection weights in llama.cpp's Q4_1 blocks)."""
    layers = hf_config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(layers)
    writer.add_context_length(hf_config["max_position_embeddings"])
    writer.add_embedding_length(hf_config["hidden_size"])
    writer.add_feed_forward_length(hf_config["intermediate_size"])
    writer.add_head_count(hf_config["num_attention_heads"])
    writer.add_head_count_kv(hf_config["num_key_value_heads"])
    writer.add_rope_freq_base(hf_config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(hf_config["rms_norm_eps"])
    writer.add_token_list([f"t{i}" for i in range(hf_config["vocab_size"])])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for key, value in tensors.items():
        module, suffix = key.rsplit(".", 1)
        if permute and module.endswith("q_proj"):
            value = _llama_cpp_permute(value, hf_config["num_attention_heads"])
        elif permute and module.endswith("k_proj"):
            value = _llama_cpp_permute(value, hf_config["num_key_value_heads"])
        name = f"{names.get_name(module)}.{suffix}"
        if q4_1 and module.endswith("_proj") and suffix == "weight":
            quantized = gguf.quants.quantize(value, gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(name, quantized, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unpermute_inverts_llama_cpp_permute():
    weight = np.arange(2 * 8 * 3, dtype=np.float32).reshape(16, 3)  # 2 heads, head_dim 8
    permuted = _llama_cpp_permute(weight, 2)
    # llama.cpp interleaves each head's halves: rows 0, 4, 1, 5, 2, 6, 3, 7 of head 0.
    np.testing.assert_array_equal(permuted[:8, 0], weight[[0, 4, 1, 5, 2, 6, 3, 7], 0])
    np.testing.assert_array_equal(gguf_reader._unpermute_rows(permuted, 2), weight)


def test_hf_names():
    assert gguf_reader.hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert gguf_reader.hf_name("blk.0.attn_k.bias") == "model.layers.0.self_attn.k_proj.bias"
    assert gguf_reader.hf_name("blk.2.ffn_norm.weight") == (
        "model.layers.2.post_attention_layernorm.weight"
    )
    assert gguf_reader.hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_reader.hf_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match="blk.0.ffn_gate_exps.weight"):
        gguf_reader.hf_name("blk.0.ffn_gate_exps.weight")


def test_written_gguf_round_trips_to_hf_tensors(tiny_llama_dir, tmp_path):
    """A GGUF written like llama.cpp does (GQA: q and k permuted with different head counts)
    reads back to the exact HF tensors and an equivalent config."""
    hf_config = model_files.read_hf_config(tiny_llama_dir)
    tensors = model_files.read_safetensors(tiny_llama_dir)
    path = _write_gguf(tmp_path / "tiny.gguf", hf_config, tensors)
    config, read = gguf_reader.read_gguf(path)
    assert set(read) == set(tensors)
    for key, value in tensors.items():
        np.testing.assert_array_equal(read[key], value, err_msg=key)
    ours = llama.LlamaConfig.from_hf(config)
    reference = llama.LlamaConfig.from_hf(hf_config)
    for field in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "rope_theta",
        "tie_word_embeddings",
    ):
        assert getattr(ours, field) == getattr(reference, field), field
    assert (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    # Same weights through either door give the same model.
    _, _, from_dir = load_llama(tiny_llama_dir)
    _, _, from_gguf = load_llama(path)
    jax.tree.map(np.testing.assert_array_equal, from_dir, from_gguf)


def test_errors(tiny_llama_dir, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        gguf_reader.read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError, match="not a packaged GGUF"):
        model_files.resolve_gguf(str(tmp_path / "missing.gguf"))
    hf_config = model_files.read_hf_config(tiny_llama_dir)
    tensors = model_files.read_safetensors(tiny_llama_dir)
    gpt2 = _write_gguf(tmp_path / "gpt2.gguf", hf_config, tensors, arch="gpt2", permute=False)
    with pytest.raises(ValueError, match="architecture 'gpt2'.*not supported"):
        gguf_reader.read_gguf(gpt2)
    path = _write_gguf(tmp_path / "tiny.gguf", hf_config, tensors)

    def no_dequantize(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", no_dequantize)
    with pytest.raises(ValueError, match="quantisation type F32"):
        gguf_reader.read_gguf(path)


def test_packaged_smollm2_tensors_and_config(smollm2_gguf):
    assert smollm2_gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert model_files.is_gguf("smollm2-135m-instruct") and model_files.is_gguf(str(smollm2_gguf))
    assert not model_files.is_gguf("all-minilm-l6-v2")
    start = time.perf_counter()
    config, tensors = gguf_reader.read_gguf(smollm2_gguf)
    print(f"read + dequantise SmolLM2 GGUF: {time.perf_counter() - start:.2f} s")
    assert config["model_type"] == "llama" and config["tie_word_embeddings"] is True
    expected = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rope_theta=100000.0,
        max_position_embeddings=8192,
    )
    assert {k: config[k] for k in expected} == expected
    assert len(tensors) == 272 and "lm_head.weight" not in tensors
    assert sum(t.size for t in tensors.values()) == 134_515_008
    assert all(t.dtype == np.float32 for t in tensors.values())
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert tensors["model.embed_tokens.weight"].shape == (49152, 576)


# ----------------------------------------------------------------------------- vs transformers


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    """transformers' own GGUF loading of the packaged file: (model, tokenizer, seconds).

    `from_pretrained(dir, gguf_file=...)` insists on `accelerate` (for device maps we do not
    use), so this runs the same pieces by hand: config and tokenizer from the GGUF, then
    `load_gguf_checkpoint` (dequantise, undo the q/k permutation) into a float32 model.
    """
    import torch
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    start = time.perf_counter()
    kwargs = dict(gguf_file=smollm2_gguf.name)
    config = transformers.AutoConfig.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    loaded = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)
    result = model.load_state_dict(loaded["tensors"], strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    return model, tokenizer, time.perf_counter() - start


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers_gguf_loader(smollm2_gguf, hf_smollm2):
    model, _, _ = hf_smollm2
    _, tensors = gguf_reader.read_gguf(smollm2_gguf)
    expected = {k: v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    assert set(tensors) == set(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(tensors[key], value, err_msg=key)


def _greedy_torch(model, ids: np.ndarray, steps: int) -> tuple[list[int], np.ndarray]:
    """transformers' greedy decoding with its KV cache (one token per step after the prompt);
    returns the tokens and the prompt's logits. Stops at no EOS, like `_greedy_ours`."""
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids).long(), use_cache=True)
        prompt_logits = out.logits.numpy()
        tokens = [int(out.logits[0, -1].argmax())]
        for _ in range(steps - 1):
            out = model(
                input_ids=torch.tensor([[tokens[-1]]]),
                past_key_values=out.past_key_values,
                use_cache=True,
            )
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens, prompt_logits


def _greedy_ours(apply, params, ids: np.ndarray, steps: int):
    """Greedy decoding by full forward passes over one fixed-length buffer (one compile):
    causal attention makes position t's logits independent of the unused tail."""
    length = ids.shape[1]
    buffer = np.zeros((1, length + steps), np.int32)
    buffer[0, :length] = ids[0]
    first_logits = None
    for t in range(length, length + steps):
        logits = np.asarray(apply(params, buffer))
        if first_logits is None:
            first_logits = logits[:, :length]
        buffer[0, t] = int(logits[0, t - 1].argmax())
    return list(buffer[0, length:]), first_logits


@pytest.mark.slow
def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2_gguf, hf_smollm2):
    model, tokenizer, hf_load_s = hf_smollm2
    messages = [{"role": "user", "content": "What is the capital of France? Answer briefly."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="np")["input_ids"].astype(np.int32)

    start = time.perf_counter()
    config, module, params = load_llama(smollm2_gguf)
    load_s = time.perf_counter() - start
    apply = jax.jit(lambda p, x: module.apply({"params": p}, x))
    start = time.perf_counter()
    ours_tokens, ours_logits = _greedy_ours(apply, params, ids, 20)
    ours_s = time.perf_counter() - start
    start = time.perf_counter()
    hf_tokens, hf_logits = _greedy_torch(model, ids, 20)
    hf_s = time.perf_counter() - start

    diff = np.abs(ours_logits - hf_logits).max()
    print(
        f"SmolLM2 prompt of {ids.shape[1]} tokens: max |logit diff| {diff:.2e} "
        f"(logit range {hf_logits.min():.1f}..{hf_logits.max():.1f}); "
        f"ours: load {load_s:.1f} s, compile + 20 greedy steps {ours_s:.1f} s; "
        f"transformers: load {hf_load_s:.1f} s, prompt + 19 cached steps {hf_s:.1f} s\n"
        f"greedy: {tokenizer.decode(ours_tokens)!r}"
    )
    assert config.tie_word_embeddings and "lm_head" not in params
    assert diff < 1e-3
    assert ours_tokens == hf_tokens
