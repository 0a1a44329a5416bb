"""Llama-family decoders (HF `model_type` llama, qwen2, mistral): config, modules, HF weights.

One file serves Llama 2/3, SmolLM2, Qwen2 (q/k/v biases) and Mistral (sliding window): they
differ only in config. Attention goes through `jax.nn.dot_product_attention`, so a GPU can
run a fused kernel (`attention_impl="cudnn"`); grouped-query attention is native there (keys
and values keep their `num_key_value_heads` heads, nothing is repeated).

Logical axis names used by the params: `vocab`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`;
by activation constraints: `batch`, `length`, `activation_embed`.

Parity with transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM is checked
in tests/test_llama.py.

Generation uses an optional, purely functional KV cache (`init_cache`; the `cache` and
`cache_index` arguments of `LlamaForCausalLM`): a call writes its chunk's keys and values at
slots `cache_index ...` and returns the new cache beside the logits (see generate.py).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from finetune_jax import peft, weights
from finetune_jax.models import layers
from finetune_jax.models.layers import HFMapping

MODEL_TYPES = ("llama", "qwen2", "mistral")
ACTIVATION_AXES = ("batch", "length", "activation_embed")
SLIDING = "sliding_attention"
PEFT_TASK_TYPE = "CAUSAL_LM"  # HF PEFT task type of exported adapters
PEFT_MODULES_TO_SAVE = ()  # no new head: nothing but the LoRA params to export
HEAD_BIAS = None  # the LM head is pretrained and has no bias


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
    dtype: str = "float32"  # compute dtype; params are always float32
    remat: str = "none"  # none | full | dots_saveable (see layers.remat)
    attention_impl: str | None = None  # jax.nn.dot_product_attention: None (XLA) or "cudnn"
    lora: peft.LoraConfig | None = None  # LoRA on the DenseND kernels its targets match

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
        if rope_type not in layers.ROPE_TYPES:
            raise ValueError(f"Unsupported rope_type {rope_type!r}; supported: {layers.ROPE_TYPES}")
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


def _normal(config: LlamaConfig, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def _zeros(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def attend(q_BTNH, k_BSKH, v_BSKH, mask_B1TS=None, *, is_causal=True, implementation=None):
    """Scaled dot-product attention with grouped-query heads (N a multiple of K).

    `mask_B1TS` (bool, True = may attend) adds padding / packing / window limits to the
    causal one. `is_causal` assumes query i and key i are the same token; a KV cache
    (queries offset into longer keys) passes `is_causal=False` and its own causal mask.
    """
    return jax.nn.dot_product_attention(
        q_BTNH,
        k_BSKH,
        v_BSKH,
        mask=mask_B1TS,
        is_causal=is_causal,
        implementation=implementation,
    )


class LlamaAttention(nn.Module):
    """q/k/v projections + RoPE (`project`), then `attend`, then the output projection."""

    config: LlamaConfig

    def setup(self) -> None:
        cfg = self.config

        # DenseND, not nn.DenseGeneral: its flattened init breaks logical names under a mesh.
        def dense(heads: int, axis: str) -> layers.DenseND:
            return layers.DenseND(
                features=(heads, cfg.head_dim),
                dtype=cfg.dtype,
                kernel_init=_normal(cfg, ("embed", axis, "kv")),
                bias_init=_zeros((axis, "kv")) if cfg.attention_bias else None,
                lora=cfg.lora,
            )

        self.q_proj = dense(cfg.num_attention_heads, "heads")
        self.k_proj = dense(cfg.num_key_value_heads, "kv_heads")
        self.v_proj = dense(cfg.num_key_value_heads, "kv_heads")
        self.o_proj = layers.DenseND(
            features=(cfg.hidden_size,),
            in_axes=2,
            dtype=cfg.dtype,
            kernel_init=_normal(cfg, ("heads", "kv", "embed")),
            bias_init=_zeros(("embed",)) if cfg.o_proj_bias else None,
            lora=cfg.lora,
        )

    def project(self, x_BTD, cos_BTH, sin_BTH, deterministic=True):
        """Returns q [B,T,N,H] and k, v [B,T,K,H], with RoPE applied to q and k."""
        q_BTNH = layers.apply_rope(self.q_proj(x_BTD, deterministic), cos_BTH, sin_BTH)
        k_BTKH = layers.apply_rope(self.k_proj(x_BTD, deterministic), cos_BTH, sin_BTH)
        return q_BTNH, k_BTKH, self.v_proj(x_BTD, deterministic)

    def __call__(
        self,
        x_BTD,
        cos_BTH,
        sin_BTH,
        mask_B1TT=None,
        deterministic=True,
        cache=None,
        cache_index=None,
    ):
        """Without `cache`: self-attention over the T tokens, returns [B, T, D].

        With `cache` ({"k", "v"} [B, S, K, H]): writes this chunk's k, v at slots
        `cache_index ... cache_index + T - 1`, attends to all S slots under `mask_B1TT`
        (then [B|1, 1, T, S], carrying causality itself) and returns (out, new cache).
        """
        q_BTNH, k_BTKH, v_BTKH = self.project(x_BTD, cos_BTH, sin_BTH, deterministic)
        impl = self.config.attention_impl
        if cache is None:
            out_BTNH = attend(q_BTNH, k_BTKH, v_BTKH, mask_B1TT, implementation=impl)
            return self.o_proj(out_BTNH, deterministic)
        start = (0, cache_index, 0, 0)
        k_BSKH = lax.dynamic_update_slice(cache["k"], k_BTKH.astype(cache["k"].dtype), start)
        v_BSKH = lax.dynamic_update_slice(cache["v"], v_BTKH.astype(cache["v"].dtype), start)
        out_BTNH = attend(q_BTNH, k_BSKH, v_BSKH, mask_B1TT, is_causal=False, implementation=impl)
        return self.o_proj(out_BTNH, deterministic), {"k": k_BSKH, "v": v_BSKH}


class LlamaMLP(nn.Module):
    """SwiGLU: down(act(gate(x)) * up(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, deterministic=True):
        cfg = self.config

        def dense(features: int, names: tuple[str, str], name: str) -> layers.DenseND:
            return layers.DenseND(
                features=(features,),
                dtype=cfg.dtype,
                kernel_init=_normal(cfg, names),
                bias_init=_zeros(names[1:]) if cfg.mlp_bias else None,
                lora=cfg.lora,
                name=name,
            )

        gate_BTF = dense(cfg.intermediate_size, ("embed", "mlp"), "gate_proj")(x_BTD, deterministic)
        up_BTF = dense(cfg.intermediate_size, ("embed", "mlp"), "up_proj")(x_BTD, deterministic)
        h_BTF = layers.get_activation(cfg.hidden_act)(gate_BTF) * up_BTF
        return dense(cfg.hidden_size, ("mlp", "embed"), "down_proj")(h_BTF, deterministic)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        x_BTD,
        cos_BTH,
        sin_BTH,
        mask_B1TT=None,
        deterministic=True,
        cache=None,
        cache_index=None,
    ):
        """Returns x [B, T, D]; with `cache`, (x, new layer cache) (see LlamaAttention)."""
        cfg = self.config
        norm = functools.partial(layers.RMSNorm, epsilon=cfg.rms_norm_eps, dtype=cfg.dtype)
        h_BTD = norm(name="input_layernorm")(x_BTD)
        attention = LlamaAttention(cfg, name="self_attn")
        attended = attention(h_BTD, cos_BTH, sin_BTH, mask_B1TT, deterministic, cache, cache_index)
        if cache is not None:
            attended, cache = attended
        x_BTD = x_BTD + attended
        h_BTD = norm(name="post_attention_layernorm")(x_BTD)
        x_BTD = x_BTD + LlamaMLP(cfg, name="mlp")(h_BTD, deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        return x_BTD if cache is None else (x_BTD, cache)


class LlamaModel(nn.Module):
    """Embedding + decoder layers + final norm; returns the last hidden state [B, T, D]."""

    config: LlamaConfig

    def setup(self) -> None:
        cfg = self.config
        self.embed_tokens = nn.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            dtype=cfg.dtype,
            param_dtype=jnp.float32,
            embedding_init=_normal(cfg, ("vocab", "embed")),
        )
        # static_argnums counts `self` as 0, so 5 is `deterministic` (a Python bool).
        block = layers.remat(LlamaDecoderLayer, cfg.remat, static_argnums=(5,))
        self.layers = [block(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = layers.RMSNorm(epsilon=cfg.rms_norm_eps, dtype=cfg.dtype)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        segment_ids=None,
        positions=None,
        deterministic=True,
        cache=None,
        cache_index=None,
    ):
        """Last hidden state [B, T, D]; with `cache`, (hidden state, new cache).

        See LlamaForCausalLM for the arguments.
        """
        cfg = self.config
        length = input_ids.shape[1]
        if cache is not None and cache_index is None:
            cache_index = 0
        if positions is None:
            start = 0 if cache is None else cache_index
            positions = jnp.broadcast_to(start + jnp.arange(length), input_ids.shape)
        inv_freq_K = layers.rope_inverse_frequencies(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_parameters,
            cfg.max_position_embeddings,
            seq_len=jnp.max(positions) + 1,
        )
        cos_BTH, sin_BTH = layers.rope_cos_sin(positions, inv_freq_K, cfg.dtype)
        windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
        if cache is None:
            masks = {  # one mask per distinct window, None meaning causality alone
                w: layers.attention_mask(attention_mask, segment_ids, length, w)
                for w in set(windows)
            }
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
            slots = cache[0]["k"].shape[1]
            masks = {
                w: cache_attention_mask(attention_mask, cache_index, length, slots, w)
                for w in set(windows)
            }
        x_BTD = nn.with_logical_constraint(self.embed_tokens(input_ids), ACTIVATION_AXES)
        new_cache = []
        for i, (layer, window) in enumerate(zip(self.layers, windows)):
            if cache is None:
                x_BTD = layer(x_BTD, cos_BTH, sin_BTH, masks[window], deterministic)
            else:
                x_BTD, layer_cache = layer(
                    x_BTD, cos_BTH, sin_BTH, masks[window], deterministic, cache[i], cache_index
                )
                new_cache.append(layer_cache)
        x_BTD = self.norm(x_BTD)
        return x_BTD if cache is None else (x_BTD, tuple(new_cache))

    def attend_embedding(self, x_BTD):
        """Tied output head: logits = x @ embedding.T, float32."""
        return _logits(x_BTD, self.embed_tokens.embedding.T, self.config.dtype)


def cache_attention_mask(
    attention_mask_BS: jax.Array | None,
    cache_index: jax.Array | int,
    length: int,
    slots: int,
    window: int | None = None,
) -> jax.Array:
    """Boolean mask [B|1, 1, T, S] (True = may attend) of T queries at slots
    `cache_index ...` over S cache slots: key slot <= query slot, slot distance < `window`,
    and keys valid in `attention_mask_BS` (None: all valid).

    A query still sees its own slot when that slot is invalid (a padding token): no row is
    then fully masked, since a fused kernel may return NaN for one, and a NaN v written
    into the cache would reach real rows as 0 * NaN.
    """
    query_T1 = (cache_index + jnp.arange(length))[:, None]
    key_1S = jnp.arange(slots)[None, :]
    mask_TS = key_1S <= query_T1
    if window is not None:
        mask_TS &= query_T1 - key_1S < window
    if attention_mask_BS is None:
        return mask_TS[None, None]
    if attention_mask_BS.shape[-1] != slots:
        raise ValueError(
            f"With a KV cache attention_mask marks the valid cache slots: shape [B, {slots}] "
            f"expected, got {attention_mask_BS.shape}"
        )
    valid_B1TS = attention_mask_BS.astype(bool)[:, None, None, :] | (key_1S == query_T1)
    return mask_TS[None, None] & valid_B1TS


def init_cache(config: LlamaConfig, batch: int, length: int) -> tuple[dict[str, jax.Array], ...]:
    """An empty KV cache: per layer {"k", "v"} zeros [batch, length, K, H], compute dtype."""
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    return tuple(
        {"k": jnp.zeros(shape, config.dtype), "v": jnp.zeros(shape, config.dtype)}
        for _ in range(config.num_hidden_layers)
    )


def _logits(x_BTD, kernel_DV, dtype):
    # Inputs in the compute dtype, accumulation and result in float32: bf16 logits lose the
    # small differences cross-entropy over a large vocabulary depends on.
    return jnp.einsum(
        "btd,dv->btv",
        x_BTD.astype(dtype),
        kernel_DV.astype(dtype),
        preferred_element_type=jnp.float32,
    )


class LMHead(nn.Module):
    """Untied output projection `kernel` [D, V]; float32 logits.

    The DenseND shares this module's scope, so the kernel stays at `lm_head/kernel`.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(self, x_BTD, deterministic=True):
        cfg = self.config
        dense = layers.DenseND(
            features=(cfg.vocab_size,),
            dtype=cfg.dtype,
            out_dtype=jnp.float32,  # as in `_logits`: float32 accumulation and logits
            kernel_init=_normal(cfg, ("embed", "vocab")),
            lora=cfg.lora,
            name="dense",
        )
        nn.share_scope(self, dense)
        return dense(x_BTD, deterministic)


class LlamaForCausalLM(nn.Module):
    """LlamaModel + output head; returns float32 logits [B, T, V].

    attention_mask [B, T] 0/1 masks padded keys; segment_ids [B, T] int restrict attention to
    the query's own segment (packing); positions [B, T] default to 0..T-1 (pass per-segment
    positions when packing). These architectures train without dropout; `deterministic`
    only switches LoRA dropout (`LoraConfig.dropout`), if any.

    KV cache (generation): with `cache` from `init_cache` (S slots), the T tokens are written
    at slots `cache_index ... cache_index + T - 1` (int, may be traced; the caller keeps it
    within S, as `lax.dynamic_update_slice` would clamp it) and attend to every slot at or
    before their own (`cache_attention_mask`); `attention_mask` is then [B, S], the validity
    of the cache slots (0 for left padding), and positions [B, T] default to the slot indices
    (left-padded prompts pass cumsum(mask) - 1). Returns (logits, new cache); packing is not
    supported. `last_logits_only` returns the last position's logits [B, 1, V]: a prefill
    needs no more, and [B, T, V] float32 is large for big vocabularies.
    """

    config: LlamaConfig

    @nn.compact
    def __call__(
        self,
        input_ids,
        attention_mask=None,
        segment_ids=None,
        positions=None,
        deterministic=True,
        cache=None,
        cache_index=None,
        last_logits_only=False,
    ):
        model = LlamaModel(self.config, name="model")
        out = model(
            input_ids, attention_mask, segment_ids, positions, deterministic, cache, cache_index
        )
        x_BTD, new_cache = (out, None) if cache is None else out
        if last_logits_only:
            x_BTD = x_BTD[:, -1:]
        if self.config.tie_word_embeddings:
            logits_BTV = model.attend_embedding(x_BTD)
        else:
            logits_BTV = LMHead(self.config, name="lm_head")(x_BTD, deterministic)
        return logits_BTV if cache is None else (logits_BTV, new_cache)


# ----------------------------------------------------------------------------- HF weights


def hf_mappings(config: LlamaConfig) -> list[HFMapping]:
    """HF tensors (keys without `model.`) and where they go in our `model` subtree."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    rows = [HFMapping("embed_tokens.weight", "embed_tokens/embedding", (v, d), (v, d))]
    for i in range(config.num_hidden_layers):
        hf, ours = f"layers.{i}", f"layers_{i}"
        for name, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
            key, path = f"{hf}.self_attn.{name}", f"{ours}/self_attn/{name}"
            rows.append(
                HFMapping(f"{key}.weight", f"{path}/kernel", (heads * h, d), (d, heads, h), True)
            )
            if config.attention_bias:
                rows.append(HFMapping(f"{key}.bias", f"{path}/bias", (heads * h,), (heads, h)))
        rows.append(
            HFMapping(
                f"{hf}.self_attn.o_proj.weight",
                f"{ours}/self_attn/o_proj/kernel",
                (d, n * h),
                (n, h, d),
                True,
            )
        )
        if config.o_proj_bias:
            rows.append(
                HFMapping(
                    f"{hf}.self_attn.o_proj.bias", f"{ours}/self_attn/o_proj/bias", (d,), (d,)
                )
            )
        for name, out, inp in (("gate_proj", f, d), ("up_proj", f, d), ("down_proj", d, f)):
            key, path = f"{hf}.mlp.{name}", f"{ours}/mlp/{name}"
            rows.append(HFMapping(f"{key}.weight", f"{path}/kernel", (out, inp), (inp, out), True))
            if config.mlp_bias:
                rows.append(HFMapping(f"{key}.bias", f"{path}/bias", (out,), (out,)))
        for name in ("input_layernorm", "post_attention_layernorm"):
            rows.append(HFMapping(f"{hf}.{name}.weight", f"{ours}/{name}/scale", (d,), (d,)))
    rows.append(HFMapping("norm.weight", "norm/scale", (d,), (d,)))
    return rows


def _head_mapping(config: LlamaConfig) -> list[HFMapping]:
    if config.tie_word_embeddings:
        return []
    shape = (config.vocab_size, config.hidden_size)
    return [HFMapping("weight", "kernel", shape, shape[::-1], True)]


def hf_param_mappings(config: LlamaConfig) -> list[HFMapping]:
    """Every param of LlamaForCausalLM: full paths and full HF keys."""
    rows = [
        m._replace(hf_key="model." + m.hf_key, path="model/" + m.path) for m in hf_mappings(config)
    ]
    head = _head_mapping(config)
    return rows + [m._replace(hf_key="lm_head." + m.hf_key, path="lm_head/" + m.path) for m in head]


def from_hf(hf_tensors: Mapping[str, np.ndarray], config: LlamaConfig) -> dict[str, Any]:
    """HF tensors (`model.*`, `lm_head.weight`) -> our full param tree (float32 numpy).

    Every param comes from the checkpoint; a missing or wrongly shaped tensor is a
    ValueError naming the HF key, our path and both shapes, and so is a tensor the config
    has no place for. With tied embeddings an `lm_head.weight` in the file is ignored.
    """
    mappings = hf_mappings(config)
    known = {"model." + m.hf_key for m in mappings} | {"lm_head.weight"}
    # Buffers some checkpoints carry; everything else unknown means config and file disagree
    # (e.g. biases the config does not enable), which would silently drop weights.
    unexpected = sorted(k for k in hf_tensors if k not in known and not k.endswith("inv_freq"))
    if unexpected:
        raise ValueError(
            f"{len(unexpected)} HF tensors have no place in this config's model, e.g. "
            f"{unexpected[:3]}. Does config.json match the weights?"
        )
    model, _ = layers.convert_from_hf(
        hf_tensors, mappings, key_prefix="model.", path_prefix="model"
    )
    params = {"model": model}
    if not config.tie_word_embeddings:
        params["lm_head"], _ = layers.convert_from_hf(
            hf_tensors, _head_mapping(config), key_prefix="lm_head.", path_prefix="lm_head"
        )
    return params


def to_hf(params: Mapping[str, Any], config: LlamaConfig) -> dict[str, np.ndarray]:
    """Our unboxed params -> HF LlamaForCausalLM tensors (float32 numpy)."""
    tensors = layers.convert_to_hf(params["model"], hf_mappings(config), key_prefix="model.")
    if not config.tie_word_embeddings:
        tensors.update(
            layers.convert_to_hf(params["lm_head"], _head_mapping(config), key_prefix="lm_head.")
        )
    return tensors


@functools.partial(jax.jit, static_argnums=(0, 2))
def init_params(config: LlamaConfig, rng: jax.Array, seq_len: int = 8) -> dict[str, Any]:
    """Initialises LlamaForCausalLM; returns the boxed (nn.Partitioned) params.

    For shapes and logical names without allocating:
    `jax.eval_shape(functools.partial(init_params, config), rng)`.
    """
    input_ids = jnp.zeros((1, seq_len), jnp.int32)
    return LlamaForCausalLM(config).init({"params": rng}, input_ids)["params"]


def load_pretrained(
    path: str | pathlib.Path,
    dtype: str = "float32",
    seed: int = 0,
    lora: peft.LoraConfig | None = None,
    **overrides: Any,
) -> tuple[LlamaConfig, LlamaForCausalLM, dict[str, Any]]:
    """Builds a causal LM from an HF directory, a `.gguf` file, or a name `weights` resolves.

    All params come from the checkpoint except, with `lora`, the LoRA params, which are
    initialised from `seed`. Params are unboxed float32 numpy arrays on the host, so the
    caller decides their placement and sharding.
    """
    hf_config, tensors = weights.read_checkpoint(path)
    config = LlamaConfig.from_hf(hf_config, dtype=dtype, lora=lora, **overrides)
    params = from_hf(tensors, config)
    if lora is not None:
        init_fn = functools.partial(init_params, config)
        params = peft.add_params(params, peft.init_lora_params(init_fn, seed))
    return config, LlamaForCausalLM(config), params
