"""Llama-family decoders (HF `model_type` llama, qwen2, mistral): the Flax modules and init.

One file serves Llama 2/3, SmolLM2, Qwen2 (q/k/v biases) and Mistral (sliding window): they
differ only in config (`llama_config.py`; HF layout in `llama_hf.py`). Attention goes through `jax.nn.dot_product_attention`, so a GPU can
run a fused kernel (`attention_impl="cudnn"`); grouped-query attention is native there (keys
and values keep their `num_key_value_heads` heads, nothing is repeated).

Logical axis names used by the params: `vocab`, `embed`, `heads`, `kv_heads`, `kv`, `mlp`;
by activation constraints: `batch`, `length`, `activation_embed`.

Parity with transformers' LlamaForCausalLM / Qwen2ForCausalLM / MistralForCausalLM is checked
in tests/test_llama.py.

Generation uses an optional, purely functional KV cache (`init_cache`; the `cache` and
`cache_index` arguments of `LlamaForCausalLM`): a call writes its chunk's keys and values at
slots `cache_index ...` and returns the new cache beside the logits (see evaluation/lm_generation.py).

With `scan_layers` the decoder layers run as one `nn.scan`: their params (and the cache) are
stacked along a leading axis named `layers` (`model/layers/...` instead of `model/layers_{i}/...`),
so compile time and program size do not grow with depth.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from finetune_jax.models import attention, layers, llama_hf, prompt_tuning, rope
from finetune_jax.models import lora as lora_lib
from finetune_jax.models.family import HeadSpec, ModelFamily
from finetune_jax.models.llama_config import ACTIVATION_AXES, MODEL_TYPES, LlamaConfig


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
                param_dtype=cfg.param_dtype,
                kernel_init=layers.normal_init(cfg.initializer_range, ("embed", axis, "kv")),
                bias_init=layers.zeros_init((axis, "kv")) if cfg.attention_bias else None,
                lora=cfg.lora,
            )

        self.q_proj = dense(cfg.num_attention_heads, "heads")
        self.k_proj = dense(cfg.num_key_value_heads, "kv_heads")
        self.v_proj = dense(cfg.num_key_value_heads, "kv_heads")
        self.o_proj = layers.DenseND(
            features=(cfg.hidden_size,),
            in_axes=2,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=layers.normal_init(cfg.initializer_range, ("heads", "kv", "embed")),
            bias_init=layers.zeros_init(("embed",)) if cfg.o_proj_bias else None,
            lora=cfg.lora,
        )

    def project(self, x_BTD, cos_BTH, sin_BTH, deterministic=True):
        """Returns q [B,T,N,H] and k, v [B,T,K,H], with RoPE applied to q and k."""
        q_BTNH = rope.apply_rope(self.q_proj(x_BTD, deterministic), cos_BTH, sin_BTH)
        k_BTKH = rope.apply_rope(self.k_proj(x_BTD, deterministic), cos_BTH, sin_BTH)
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
            out_BTNH = attention.attend(q_BTNH, k_BTKH, v_BTKH, mask_B1TT, implementation=impl)
            return self.o_proj(out_BTNH, deterministic)
        start = (0, cache_index, 0, 0)
        k_BSKH = lax.dynamic_update_slice(cache["k"], k_BTKH.astype(cache["k"].dtype), start)
        v_BSKH = lax.dynamic_update_slice(cache["v"], v_BTKH.astype(cache["v"].dtype), start)
        out_BTNH = attention.attend(
            q_BTNH, k_BSKH, v_BSKH, mask_B1TT, is_causal=False, implementation=impl
        )
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
                param_dtype=cfg.param_dtype,
                kernel_init=layers.normal_init(cfg.initializer_range, names),
                bias_init=layers.zeros_init(names[1:]) if cfg.mlp_bias else None,
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
        norm = functools.partial(
            layers.RMSNorm, epsilon=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
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
            param_dtype=cfg.param_dtype,
            embedding_init=layers.normal_init(cfg.initializer_range, ("vocab", "embed")),
        )
        # static_argnums counts `self` as 0, so 5 is `deterministic` (a Python bool).
        block = layers.remat(
            LlamaDecoderLayer, cfg.remat, static_argnums=(5,), scanned=cfg.scan_layers
        )
        if cfg.scan_layers:  # one module, its params stacked over the layers (`_scanned`)
            stack = "/".join((*self.scope.path, "layers"))
            self.layers = block(lora_lib.for_layer_stack(cfg, stack))
        else:
            self.layers = [block(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = layers.RMSNorm(
            epsilon=cfg.rms_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.virtual = prompt_tuning.virtual_tokens(cfg.lora)
        if self.virtual:  # prompt tuning: `model/prompt_embeddings`
            self.prompt = prompt_tuning.embeddings(
                self, self.virtual, cfg.hidden_size, cfg.initializer_range, cfg.param_dtype
            )

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
        x_BTD = self.embed_tokens(input_ids)
        virtual = 0
        if self.virtual:
            x_BTD, attention_mask, segment_ids, positions, cache_index, virtual = (
                prompt_tuning.decoder_inputs(
                    self.prompt, x_BTD, attention_mask, segment_ids, positions, cache, cache_index
                )
            )
        length = x_BTD.shape[1]
        inv_freq_K = rope.rope_inverse_frequencies(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_parameters,
            cfg.max_position_embeddings,
            seq_len=jnp.max(positions) + 1,
        )
        cos_BTH, sin_BTH = rope.rope_cos_sin(positions, inv_freq_K, cfg.dtype)
        windows = {cfg.window(i) for i in range(cfg.num_hidden_layers)}
        # Cache slots: axis -3 of k, stacked over the layers ([L, B, S, K, H]) or not.
        slots = None if cache is None else jax.tree.leaves(cache)[0].shape[-3]
        masks = attention.window_masks(
            windows, attention_mask, segment_ids, length, slots, cache_index, virtual
        )
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        run = self._scanned if cfg.scan_layers else self._unrolled
        x_BTD, new_cache = run(x_BTD, cos_BTH, sin_BTH, masks, deterministic, cache, cache_index)
        x_BTD = prompt_tuning.drop_virtual(self.norm(x_BTD), virtual)
        return x_BTD if cache is None else (x_BTD, new_cache)

    def _unrolled(self, x_BTD, cos_BTH, sin_BTH, masks, deterministic, cache, cache_index):
        """Layer after layer, each with its own params (`layers_{i}`) and cache entry."""
        new_cache = []
        for i, layer in enumerate(self.layers):
            mask = masks[self.config.window(i)]
            if cache is None:
                x_BTD = layer(x_BTD, cos_BTH, sin_BTH, mask, deterministic)
            else:
                x_BTD, layer_cache = layer(
                    x_BTD, cos_BTH, sin_BTH, mask, deterministic, cache[i], cache_index
                )
                new_cache.append(layer_cache)
        return x_BTD, tuple(new_cache)

    def _scanned(self, x_BTD, cos_BTH, sin_BTH, masks, deterministic, cache, cache_index):
        """One `nn.scan` over the stacked params (`layers/...`, leading layer axis): the
        program has one layer in it whatever the depth. The cache, if any, is stacked the
        same way and scanned with the layers; each layer's window selects its mask."""
        cfg = self.config
        windows = [cfg.window(i) for i in range(cfg.num_hidden_layers)]
        mask_stack, index_L = attention.stack_window_masks(masks, windows)

        def body(layer, x_BTD, xs):
            index, layer_cache = xs
            mask = mask_stack if index is None else mask_stack[index]
            if layer_cache is None:
                return layer(x_BTD, cos_BTH, sin_BTH, mask, deterministic), None
            return layer(x_BTD, cos_BTH, sin_BTH, mask, deterministic, layer_cache, cache_index)

        scan = layers.scan_layers(body, cfg.num_hidden_layers)
        return scan(self.layers, x_BTD, (index_L, cache))

    def attend_embedding(self, x_BTD):
        """Tied output head: logits = x @ embedding.T, float32."""
        return _logits(x_BTD, self.embed_tokens.embedding.T, self.config.dtype)


Cache = tuple[dict[str, jax.Array], ...] | dict[str, jax.Array]


def init_cache(config: LlamaConfig, batch: int, length: int) -> Cache:
    """An empty KV cache in the compute dtype: per layer {"k", "v"} zeros [batch, length, K,
    H]; with `scan_layers` one {"k", "v"} stacked over the layers [L, batch, length, K, H].
    Prompt tuning's virtual tokens take n more slots before the `length` the caller indexes."""
    length += prompt_tuning.virtual_tokens(config.lora)
    shape = (batch, length, config.num_key_value_heads, config.head_dim)
    if config.scan_layers:
        stacked = (config.num_hidden_layers, *shape)
        return {"k": jnp.zeros(stacked, config.dtype), "v": jnp.zeros(stacked, config.dtype)}
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
            param_dtype=cfg.param_dtype,
            out_dtype=jnp.float32,  # as in `_logits`: float32 accumulation and logits
            kernel_init=layers.normal_init(cfg.initializer_range, ("embed", "vocab")),
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

    Prompt tuning (`config.lora.method == "prompt"`) prepends its virtual tokens inside
    (`prompt_tuning.decoder_inputs`): outputs, positions and cache slots stay the caller's
    (`init_cache` adds the virtual tokens' slots; a prefill passes `cache_index=0`).

    `return_hidden` returns the final (normed) hidden state [B, T, D] instead of logits, and
    `logits_from_hidden` maps any slice of it to logits with the same head: a loss can then
    apply the head chunk by chunk and never hold [B, T, V] (training/losses.py).
    """

    config: LlamaConfig

    def setup(self) -> None:
        # setup, not compact: `logits_from_hidden` must reach the same head as `__call__`.
        self.model = LlamaModel(self.config)
        if not self.config.tie_word_embeddings:
            self.lm_head = LMHead(self.config)

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
        return_hidden=False,
    ):
        out = self.model(
            input_ids, attention_mask, segment_ids, positions, deterministic, cache, cache_index
        )
        x_BTD, new_cache = (out, None) if cache is None else out
        if last_logits_only:
            x_BTD = x_BTD[:, -1:]
        if return_hidden and not self.is_initializing():
            result = x_BTD
        else:  # init always builds the head, so its params exist for `logits_from_hidden`
            result = self.logits_from_hidden(x_BTD, deterministic)
        return result if cache is None else (result, new_cache)

    def logits_from_hidden(self, x_BTD, deterministic=True):
        """Final hidden state [B, T, D] (any T) -> float32 logits [B, T, V] via the head."""
        if self.config.tie_word_embeddings:
            return self.model.attend_embedding(x_BTD)
        return self.lm_head(x_BTD, deterministic)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("seq_len", "head"))
def init_params(
    config: LlamaConfig, rng: jax.Array, seq_len: int = 8, head: type | None = None
) -> dict[str, Any]:
    """Initialises LlamaForCausalLM; returns the boxed (nn.Partitioned) params.

    For shapes and logical names without allocating:
    `jax.eval_shape(functools.partial(init_params, config), rng)`.
    """
    input_ids = jnp.zeros((1, seq_len), jnp.int32)
    return (head or LlamaForCausalLM)(config).init({"params": rng}, input_ids)["params"]


FAMILY = ModelFamily(
    name="llama",
    model_types=MODEL_TYPES,
    config_from_hf=LlamaConfig.from_hf,
    heads={
        "causal_lm": HeadSpec(
            module=LlamaForCausalLM,
            hf_rows=llama_hf.lm_head_mappings,
            hf_class_suffix="ForCausalLM",
            peft_task_type="CAUSAL_LM",
        )
    },
    init=lambda head, config, rng: init_params(config, rng, head=head),
    backbone_mappings=llama_hf.backbone_mappings,
    layer_stacks=llama_hf.layer_stacks,
    layer_pattern=r".*/layers_(\d+)/.*",
    lora_targets=r".*/self_attn/(q_proj|v_proj)/kernel",
    ia3_targets=r".*/(self_attn/(k_proj|v_proj)|mlp/down_proj)/kernel",
    ia3_feedforward=r".*/mlp/down_proj/kernel",
    quantize_targets=r".*/(self_attn/(q|k|v|o)_proj|mlp/(gate|up|down)_proj)/kernel",
    word_embeddings="model/embed_tokens/embedding",
    strict=True,  # every tensor of a decoder checkpoint has a place; others mean a mismatch
    # RoPE buffers some checkpoints carry; a tied model's file may still hold its lm_head copy.
    ignored_tensors=("inv_freq", "lm_head.weight"),
    hf_class_names={"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"},
)
