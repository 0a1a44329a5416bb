"""Read a llama.cpp GGUF file into an HF-style config dict and HF-named float32 tensors.

Quantised tensors (Q4_1, Q8_0, ...) are dequantised with the `gguf` package; no torch. The
result has HF's names and layouts, so the Llama family's mapping loads it like a safetensors
checkpoint. Two llama.cpp conventions are undone on the way:

- GGUF lists dimensions fastest-first; the reader's numpy arrays already have them reversed,
  which for a linear weight is torch's [out, in].
- For the "llama" architecture, llama.cpp's converter permutes the rows of q_proj / k_proj
  (weights and biases) within each head, from HF's rotate-half RoPE layout (dim i pairs with
  i + H/2) to the interleaved one (2i pairs with 2i + 1) its kernel uses; k uses the KV head
  count. `_unpermute_rows` is the inverse, as in transformers'
  `LlamaTensorProcessor._reverse_permute_weights`. Qwen2 is stored unpermuted.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Any

import gguf
import numpy as np

SUPPORTED_ARCHITECTURES = ("llama", "qwen2")
# Per-block llama.cpp tensor names -> HF module names (inside `model.layers.{i}.`).
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_REQUIRED = object()


def hf_name(gguf_name: str) -> str:
    """llama.cpp tensor name -> HF name, e.g. blk.3.attn_q.weight -> model.layers.3...."""
    if match := _BLOCK_PATTERN.fullmatch(gguf_name):
        layer, module, kind = match.groups()
        if module in _BLOCK_NAMES:
            return f"model.layers.{layer}.{_BLOCK_NAMES[module]}.{kind}"
    else:
        module, _, kind = gguf_name.rpartition(".")
        if module in _GLOBAL_NAMES and kind in ("weight", "bias"):
            return f"{_GLOBAL_NAMES[module]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart this reader knows")


def _unpermute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (H/2, 2) -> (2, H/2)."""
    half = weight.shape[0] // heads // 2
    rows = weight.reshape(heads, half, 2, *weight.shape[1:])
    return rows.swapaxes(1, 2).reshape(weight.shape)


def _field(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise ValueError(f"GGUF file has no metadata key {key!r}")
        return default
    return field.contents()


def _hf_config(reader: gguf.GGUFReader, arch: str, tensor_names: set[str]) -> dict[str, Any]:
    """HF config.json-style dict from the GGUF metadata (keys as in transformers' ggml.py)."""
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    tokens = _field(reader, "tokenizer.ggml.tokens", None)
    vocab = len(tokens) if tokens is not None else _field(reader, f"{arch}.vocab_size")
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
        "num_hidden_layers": _field(reader, f"{arch}.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _field(
            reader,
            f"{arch}.attention.key_length",
            _field(reader, f"{arch}.rope.dimension_count", hidden // heads),
        ),
        "max_position_embeddings": _field(reader, f"{arch}.context_length"),
        # float32 in the file (1e-5 reads as 9.99999974738e-06), used as stored, like HF.
        "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        # HF Llama's attention_bias covers q, k, v and o; Qwen2 always has q/k/v biases.
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": "blk.0.ffn_up.bias" in tensor_names,
        "hidden_act": "silu",
    }
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    elif scaling != "none":
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported (only linear)")
    for ours, key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        token_id = _field(reader, f"tokenizer.ggml.{key}_token_id", None)
        if token_id is not None:
            config[f"{ours}_token_id"] = token_id
    return config


def _open(path: str | os.PathLike) -> tuple[gguf.GGUFReader, str, dict[str, Any]]:
    """(reader, architecture, HF config dict) of a GGUF file; tensors are not read yet."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    reader = gguf.GGUFReader(path)
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} of {path} is not supported; "
            f"supported: {SUPPORTED_ARCHITECTURES}"
        )
    tensor_names = {tensor.name for tensor in reader.tensors}
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1-style per-frequency RoPE factors; our config expresses those as
        # rope_scaling "llama3", which GGUF does not record.
        raise ValueError(f"{path} has rope_freqs (Llama 3.1 RoPE scaling), which is not supported")
    try:
        config = _hf_config(reader, arch, tensor_names)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
    return reader, arch, config


def read_gguf_config(path: str | os.PathLike) -> dict[str, Any]:
    """The HF config dict of a GGUF file, without dequantising its tensors."""
    return _open(path)[2]


class GGUFTensors:
    """A GGUF file's tensors by HF name, dequantised one at a time on `get` (the file is
    memory-mapped; nothing is read until asked)."""

    def __init__(self, path: str | os.PathLike):
        self.path = path
        self.reader, self.arch, self.config = _open(path)
        self._by_name = {hf_name(t.name): t for t in self.reader.tensors}
        self._heads = {
            "attn_q": self.config["num_attention_heads"],
            "attn_k": self.config["num_key_value_heads"],
        }

    def keys(self) -> list[str]:
        return list(self._by_name)

    def get(self, name: str) -> np.ndarray:
        """One tensor in HF naming and layout, float32."""
        tensor = self._by_name[name]
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise ValueError(
                f"GGUF tensor {tensor.name!r} of {self.path} has quantisation type "
                f"{tensor.tensor_type.name}, which the gguf package cannot dequantise"
            ) from error
        array = np.asarray(array, dtype=np.float32)
        module = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if self.arch == "llama" and module in self._heads:  # weights and (rare) biases alike
            array = _unpermute_rows(array, self._heads[module])
        return np.ascontiguousarray(array)

    def blocks(self, name: str, fmt: str) -> dict[str, np.ndarray] | None:
        """The tensor's own quantized blocks, in HF layout, when the file stores it in `fmt`
        (`peft.quantize`'s name): for Q4_1, `codes` uint8 [out, in] (0..15) and `scale`,
        `min` float16 [out, in / 32]; None for any other storage. No float copy is made."""
        tensor = self._by_name[name]
        if fmt != "q4_1" or tensor.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            return None
        out_features = int(tensor.shape[-1])
        raw = np.asarray(tensor.data).reshape(out_features, -1, 20)  # f16 d, f16 m, 16 bytes
        packed = raw[..., 4:]  # weight j in the low nibble of byte j, j + 16 in its high one
        codes = np.concatenate([packed & 15, packed >> 4], axis=-1).reshape(out_features, -1)
        blocks = {
            "codes": codes,
            "scale": np.ascontiguousarray(raw[..., 0:2]).view(np.float16)[..., 0],
            "min": np.ascontiguousarray(raw[..., 2:4]).view(np.float16)[..., 0],
        }
        module = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if self.arch == "llama" and module in self._heads:  # rows permuted as in `get`
            blocks = {k: _unpermute_rows(v, self._heads[module]) for k, v in blocks.items()}
        return blocks

    def close(self) -> None:
        self._by_name.clear()


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, {HF name: float32 numpy array in HF layout}) of a GGUF file.

    Raises FileNotFoundError for a missing file and ValueError for an unsupported
    architecture, quantisation type or tensor. Reads every tensor: loading a model streams
    them one at a time through `GGUFTensors` instead.
    """
    tensors = GGUFTensors(path)
    return tensors.config, {name: tensors.get(name) for name in tensors.keys()}
