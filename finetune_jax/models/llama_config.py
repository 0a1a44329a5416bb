"""`LlamaConfig`: the hyper-parameters of the Llama family (Llama 2/3, SmolLM2, Qwen2, Mistral),
read from an HF config.json (transformers 4 or 5 style)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from finetune_jax.models import layers, rope
from finetune_jax.models import lora as lora_lib

MODEL_TYPES = ("llama", "qwen2", "mistral")
ACTIVATION_AXES = ("batch", "length", "activation_embed")
SLIDING = "sliding_attention"


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture hyper-parameters; field names follow HF's LlamaConfig.

    `rope_scaling` is HF's rope-parameter dict without `rope_theta` (None: plain RoPE); it is
    stored as a sorted tuple of items so the config stays hashable (a jit static argument).
    `attention_bias` adds q/k/v biases (Qwen2); `o_proj_bias` the output one (HF Llama's
    `attention_bias` sets both). Layers whose `layer_types` entry is "sliding_attention" see
    only the last `sliding_window` keys (Mistral).
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: num_attention_heads (no GQA)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Any = None  # dict or its sorted items; None for plain RoPE
    attention_bias: bool = False
    o_proj_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None  # None: every layer is full attention
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    model_type: str = "llama"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the params (bfloat16 halves their memory)
    remat: str = "none"  # none | full | dots_saveable (see layers.remat)
    attention_impl: str | None = None  # jax.nn.dot_product_attention: None (XLA) or "cudnn"
    lora: lora_lib.LoraConfig | None = None  # LoRA on the DenseND kernels its targets match
    scan_layers: bool = False  # one nn.scan over params stacked along a `layers` axis

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // self.num_attention_heads)
        if isinstance(self.rope_scaling, Mapping):
            set_("rope_scaling", tuple(sorted(self.rope_scaling.items())))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        if self.layer_types is not None:
            set_("layer_types", tuple(self.layer_types))
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for "
                    f"{self.num_hidden_layers} layers"
                )
        layers.get_activation(self.hidden_act)  # fail at config time, not mid-trace
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in rope.ROPE_TYPES:
            raise ValueError(f"Unsupported rope_type {rope_type!r}; supported: {rope.ROPE_TYPES}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )

    @property
    def rope_parameters(self) -> dict[str, Any] | None:
        """`rope_scaling` as a dict (None for plain RoPE)."""
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None for full attention."""
        if self.layer_types is None or self.layer_types[layer] != SLIDING:
            return None
        return self.sliding_window

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> LlamaConfig:
        """Builds a config from an HF config.json dict (transformers 4 or 5 style).

        RoPE settings come from `rope_parameters` (v5) or `rope_theta` + `rope_scaling` (v4).
        Unknown HF keys are ignored; HF's "dtype" (the storage dtype) is not our compute dtype.
        """
        model_type = hf_config.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
        names = {f.name for f in dataclasses.fields(cls)}
        skip = {"dtype", "rope_scaling", "layer_types", "sliding_window", "attention_bias"}
        kwargs = {k: v for k, v in hf_config.items() if k in names and k not in skip}
        rope = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
        kwargs["rope_theta"] = rope.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        if rope.pop("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial_rotary_factor != 1 is not supported")
        if rope_type == "llama3":
            max_len = hf_config.get("max_position_embeddings", 2048)
            rope.setdefault("original_max_position_embeddings", max_len)
        kwargs["rope_scaling"] = (
            None if rope_type == "default" else {"rope_type": rope_type, **rope}
        )
        bias = bool(hf_config.get("attention_bias", False))
        kwargs["attention_bias"] = bias or model_type == "qwen2"  # Qwen2 always has q/k/v biases
        kwargs["o_proj_bias"] = bias and model_type == "llama"
        kwargs.update(_sliding_window(hf_config, model_type))
        kwargs.update(overrides)
        return cls(**kwargs)


def _sliding_window(hf_config: Mapping[str, Any], model_type: str) -> dict[str, Any]:
    """`sliding_window` and `layer_types` as HF's Mistral / Qwen2 modelling code applies them."""
    window = hf_config.get("sliding_window")
    if model_type == "llama" or (model_type == "qwen2" and not hf_config.get("use_sliding_window")):
        window = None
    if window is None:
        return {"sliding_window": None, "layer_types": None}
    layer_types = hf_config.get("layer_types")
    if layer_types is None:
        first = hf_config.get("max_window_layers", 0) if model_type == "qwen2" else 0
        count = hf_config["num_hidden_layers"]
        layer_types = [SLIDING if i >= first else "full_attention" for i in range(count)]
    return {"sliding_window": window, "layer_types": tuple(layer_types)}
