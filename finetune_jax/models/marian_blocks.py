"""Marian's building blocks: the sinusoid tables, the SSRU cell, post-norm encoder and decoder
layers, and the encoder and decoder (each unrolled or one `nn.scan`). The head that joins
them, its init and the family are in `marian.py`.

Param names mirror HF's MarianMTModel (`self_attn`, `encoder_attn`, `fc1`,
`final_layer_norm`...) so the mapping in `marian_hf.py` is easy to audit; attention and the
MLP are Whisper's (`whisper_blocks`, with a k bias). Logical axis names of the params:
`vocab`, `embed`, `heads`, `kv`, `mlp` (the SSRU's state axis too), `layers` when scanned;
activations are constrained to (`batch`, `length`, `activation_embed`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import attention, layers
from finetune_jax.models.marian_config import ACTIVATION_AXES, MarianConfig
from finetune_jax.models.whisper_blocks import WhisperAttention, dense, feed_forward, sinusoids


@functools.lru_cache(maxsize=8)
def positions_table(length: int, channels: int, layout: str) -> np.ndarray:
    """Fixed positions [length, channels] float32, sin in the first half of the channels and
    cos in the second. "hf": transformers' MarianSinusoidalPositionalEmbedding (frequency
    10000^(-2i/D), computed in float64 as it does); "marian": Marian's own table
    (10000^(-i/(D/2 - 1)), the same as Whisper's encoder sinusoids)."""
    if layout == "marian":
        return sinusoids(length, channels)
    exponents = 2 * np.arange(channels // 2) / channels
    angles = np.arange(length)[:, None] / np.power(10000, exponents)[None, :]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def _projection(config: MarianConfig, bias: bool) -> layers.DenseND:
    """A [D, D] SSRU projection: input `embed` -> state `mlp` (LoRA may target it)."""
    return layers.DenseND(
        features=(config.d_model,),
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=layers.normal_init(config.init_std, ("embed", "mlp")),
        bias_init=layers.zeros_init(("mlp",)) if bias else None,
        lora=config.lora,
    )


class SSRU(nn.Module):
    """Marian's SSRU cell (`rnn::SSRU`, Kim et al. 2019): for inputs x_t,
    f_t = sigmoid(x_t Wf + bf), c_t = f_t * c_{t-1} + (1 - f_t) * (x_t W), output relu(c_t).

    The recurrence is linear in c, so a whole sequence is one `associative_scan` (training
    needs no loop over time); decoding carries c [B, D] in the cache. It runs in float32
    whatever the compute dtype: a long product of gates is where bf16 would drift.
    """

    config: MarianConfig

    def setup(self) -> None:
        self.x_proj = _projection(self.config, bias=False)
        self.forget_proj = _projection(self.config, bias=True)

    def __call__(self, x_BTD, deterministic=True, state_BD=None):
        """(relu(c) [B, T, D] in the compute dtype, c after the last position [B, D] float32);
        `state_BD` is c before the first position (None: zeros, a sequence's start)."""
        forget_BTD = jax.nn.sigmoid(self.forget_proj(x_BTD, deterministic).astype(jnp.float32))
        update_BTD = (1 - forget_BTD) * self.x_proj(x_BTD, deterministic).astype(jnp.float32)

        def combine(first, second):  # two steps c -> f c + u composed
            return first[0] * second[0], second[0] * first[1] + second[1]

        gate_BTD, c_BTD = jax.lax.associative_scan(combine, (forget_BTD, update_BTD), axis=1)
        if state_BD is not None:
            c_BTD = c_BTD + gate_BTD * state_BD.astype(jnp.float32)[:, None, :]
        return jax.nn.relu(c_BTD).astype(self.config.dtype), c_BTD[:, -1]


class MarianEncoderLayer(nn.Module):
    """Post-norm block: x = norm(x + attn(x)), then x = norm(x + mlp(x))."""

    config: MarianConfig

    def setup(self) -> None:
        cfg = self.config
        self.self_attn = WhisperAttention(cfg, cfg.encoder_attention_heads, key_bias=True)
        self.self_attn_layer_norm = layers.layer_norm(cfg)
        self.fc1 = dense(cfg, cfg.encoder_ffn_dim, ("embed", "mlp"))
        self.fc2 = dense(cfg, cfg.d_model, ("mlp", "embed"))
        self.final_layer_norm = layers.layer_norm(cfg)
        self.dropout = layers.Dropout(cfg.dropout)
        self.activation_dropout = layers.Dropout(cfg.activation_dropout)

    def __call__(self, x_BSD, mask, deterministic=True):
        h_BSD = self.self_attn.self_attention(x_BSD, mask, deterministic)
        x_BSD = self.self_attn_layer_norm(x_BSD + self.dropout(h_BSD, deterministic=deterministic))
        h_BSD = feed_forward(self, x_BSD, deterministic)
        x_BSD = self.final_layer_norm(x_BSD + self.dropout(h_BSD, deterministic=deterministic))
        return nn.with_logical_constraint(x_BSD, ACTIVATION_AXES)


def empty_layer_cache(config: MarianConfig, batch: int, slots: int) -> dict[str, jax.Array]:
    """One decoder layer's decode state before the first token: SSRU {"c": [B, D] float32},
    attention {"k", "v"} [B, slots, N, H] in the compute dtype."""
    if config.decoder_cell == "ssru":
        return {"c": jnp.zeros((batch, config.d_model), jnp.float32)}
    heads = config.decoder_attention_heads
    zeros = jnp.zeros((batch, slots, heads, config.d_model // heads), config.dtype)
    return {"k": zeros, "v": zeros}


class MarianDecoderLayer(nn.Module):
    """Post-norm block: causal self-attention (or the SSRU, `decoder_cell`), cross-attention
    over the memory, then the MLP, each followed by residual + LayerNorm."""

    config: MarianConfig

    def setup(self) -> None:
        cfg = self.config
        heads = cfg.decoder_attention_heads
        if cfg.decoder_cell == "ssru":
            self.ssru = SSRU(cfg)
            self.ssru_layer_norm = layers.layer_norm(cfg)
        else:
            self.self_attn = WhisperAttention(cfg, heads, key_bias=True)
            self.self_attn_layer_norm = layers.layer_norm(cfg)
        self.encoder_attn = WhisperAttention(cfg, heads, key_bias=True)
        self.encoder_attn_layer_norm = layers.layer_norm(cfg)
        self.fc1 = dense(cfg, cfg.decoder_ffn_dim, ("embed", "mlp"))
        self.fc2 = dense(cfg, cfg.d_model, ("mlp", "embed"))
        self.final_layer_norm = layers.layer_norm(cfg)
        self.dropout = layers.Dropout(cfg.dropout)
        self.activation_dropout = layers.Dropout(cfg.activation_dropout)

    def cross_key_values(self, memory_BSD, deterministic=True) -> dict[str, jax.Array]:
        """This layer's cross-attention {"k", "v"} [B, S, N, H] of the memory."""
        return self.encoder_attn.key_values(memory_BSD, deterministic)

    def __call__(
        self,
        x_BTD,
        cross_kv,
        self_mask,
        cross_mask,
        deterministic=True,
        cache=None,
        cache_index=None,
    ):
        """Returns x [B, T, D]; with `cache` (as `empty_layer_cache`), (x, new cache)."""
        if self.config.decoder_cell == "ssru":
            h_BTD, c_BD = self.ssru(x_BTD, deterministic, None if cache is None else cache["c"])
            cache, norm = (None if cache is None else {"c": c_BD}), self.ssru_layer_norm
        else:
            h_BTD = self.self_attn.self_attention(
                x_BTD, self_mask, deterministic, True, cache, cache_index
            )
            if cache is not None:
                h_BTD, cache = h_BTD
            norm = self.self_attn_layer_norm
        x_BTD = norm(x_BTD + self.dropout(h_BTD, deterministic=deterministic))
        h_BTD = self.encoder_attn.cross_attention(x_BTD, cross_kv, cross_mask, deterministic)
        x_BTD = self.encoder_attn_layer_norm(
            x_BTD + self.dropout(h_BTD, deterministic=deterministic)
        )
        h_BTD = feed_forward(self, x_BTD, deterministic)
        x_BTD = self.final_layer_norm(x_BTD + self.dropout(h_BTD, deterministic=deterministic))
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        return x_BTD if cache is None else (x_BTD, cache)


def _layer_stack(module: nn.Module, layer_cls: type, count: int, deterministic_arg: int):
    """The layers of an encoder or decoder, built in its `setup`: a list (`layers_{i}`) or,
    with `scan_layers`, one module whose params are stacked along a leading `layers` axis
    (LoRA targets then match its per-layer paths). `deterministic_arg`: the position of
    `deterministic` in the layer's call (static under remat, `self` counting as 0)."""
    cfg = module.config
    block = layers.remat(
        layer_cls, cfg.remat, static_argnums=(deterministic_arg,), scanned=cfg.scan_layers
    )
    if not cfg.scan_layers:
        return [block(cfg) for _ in range(count)]
    if cfg.lora is not None:
        stack = ("/".join((*module.scope.path, "layers")), count)
        cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, layer_stacks=(stack,)))
    return block(cfg)


def _embed(module: nn.Module, input_ids, positions, deterministic: bool, target: bool):
    """Token embeddings (scaled by sqrt(D) with `scale_embedding`; for the `target` side
    zeros at position 0 with `start_embedding: zeros`) + the fixed sinusoids at
    `positions`, then dropout."""
    cfg = module.config
    x_BTD = module.embed_tokens(input_ids)
    if cfg.scale_embedding:
        x_BTD = x_BTD * jnp.asarray(cfg.d_model**0.5, x_BTD.dtype)
    if target and cfg.start_embedding == "zeros":
        x_BTD = jnp.where((positions == 0)[..., None], jnp.zeros_like(x_BTD), x_BTD)
    table = positions_table(cfg.max_position_embeddings, cfg.d_model, cfg.sinusoid_layout)
    x_BTD = x_BTD + jnp.asarray(table, x_BTD.dtype)[positions]
    x_BTD = module.dropout(x_BTD, deterministic=deterministic)
    return nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)


def _check_length(config: MarianConfig, length: int, what: str) -> None:
    if length > config.max_position_embeddings:
        raise ValueError(
            f"{what} of {length} positions is longer than the model's "
            f"max_position_embeddings={config.max_position_embeddings}"
        )


class MarianEncoder(nn.Module):
    """Shared token embedding + sinusoids + post-norm layers (no final LayerNorm)."""

    config: MarianConfig
    embed_tokens: nn.Module

    def setup(self) -> None:
        # static_argnums counts `self` as 0, so 3 is `deterministic` (a Python bool).
        self.layers = _layer_stack(self, MarianEncoderLayer, self.config.encoder_layers, 3)
        self.dropout = layers.Dropout(self.config.dropout)

    def __call__(self, input_ids, attention_mask=None, deterministic=True):
        """Memory [B, S, D]; padding (0 in `attention_mask` [B, S]) is never attended."""
        cfg = self.config
        _check_length(cfg, input_ids.shape[1], "An encoder input")
        positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        x_BSD = _embed(self, input_ids, positions, deterministic, target=False)
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        if not cfg.scan_layers:
            for layer in self.layers:
                x_BSD = layer(x_BSD, mask, deterministic)
            return x_BSD
        body = lambda layer, x_BSD, _: (layer(x_BSD, mask, deterministic), None)  # noqa: E731
        return layers.scan_layers(body, cfg.encoder_layers)(self.layers, x_BSD, None)[0]


def _stacked(per_layer: tuple) -> Any:
    """Per-layer pytrees -> one pytree stacked along a leading layer axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *per_layer)


def _unstacked(stacked: Any, count: int) -> tuple:
    """Inverse of `_stacked`: caches keep the batch on axis 0 (beam search gathers rows)."""
    return tuple(jax.tree.map(lambda leaf, i=i: leaf[i], stacked) for i in range(count))


class MarianDecoder(nn.Module):
    """Shared token embedding + sinusoids + post-norm decoder layers (no final LayerNorm)."""

    config: MarianConfig
    embed_tokens: nn.Module

    def setup(self) -> None:
        # static_argnums counts `self` as 0, so 5 is `deterministic` (a Python bool).
        self.layers = _layer_stack(self, MarianDecoderLayer, self.config.decoder_layers, 5)
        self.dropout = layers.Dropout(self.config.dropout)

    def init_cache(self, memory_BSD, slots: int, deterministic=True) -> dict[str, Any]:
        """{"self": per layer `empty_layer_cache`, "cross": per layer the
        memory's {"k", "v"} [B, S, N, H]}; every leaf has the batch on axis 0."""
        cfg = self.config
        _check_length(cfg, slots, "A cache")
        if cfg.scan_layers:

            def body(layer, carry, _):
                return carry, layer.cross_key_values(memory_BSD, deterministic)

            stacked = layers.scan_layers(body, cfg.decoder_layers)(self.layers, 0, None)[1]
            cross = _unstacked(stacked, cfg.decoder_layers)
        else:
            cross = tuple(
                layer.cross_key_values(memory_BSD, deterministic) for layer in self.layers
            )
        empty = empty_layer_cache(cfg, memory_BSD.shape[0], slots)
        return {"self": tuple(empty for _ in cross), "cross": cross}

    def __call__(
        self,
        input_ids,
        memory=None,
        memory_mask=None,
        attention_mask=None,
        positions=None,
        deterministic=True,
        cache=None,
        cache_index=None,
    ):
        """Final hidden state [B, T, D]; with `cache`, (hidden state, new cache)."""
        cfg, length = self.config, input_ids.shape[1]
        if (memory is None) == (cache is None):
            raise ValueError(
                "decode takes either memory (the encoder output) or a cache from init_cache "
                "(which holds the memory's K/V), not both and not neither"
            )
        start, self_mask = 0, None
        if cache is None:
            _check_length(cfg, length, "A decoder input")
            if cfg.decoder_cell == "attention":
                self_mask = attention.attention_mask(attention_mask, None, length)
        else:
            start = 0 if cache_index is None else cache_index
            if cfg.decoder_cell == "attention":
                slots = cache["self"][0]["k"].shape[1]
                self_mask = attention.cache_attention_mask(attention_mask, start, length, slots)
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(length), input_ids.shape)
        cross_mask = None if memory_mask is None else memory_mask.astype(bool)[:, None, None, :]
        x_BTD = _embed(self, input_ids, positions, deterministic, target=True)
        masks = (self_mask, cross_mask, deterministic)
        run = self._scanned if cfg.scan_layers else self._unrolled
        x_BTD, new_self = run(x_BTD, memory, cache, start, masks)
        return x_BTD if cache is None else (x_BTD, {"self": new_self, "cross": cache["cross"]})

    def _unrolled(self, x_BTD, memory, cache, cache_index, masks):
        self_mask, cross_mask, deterministic = masks
        new_self = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                kv = layer.cross_key_values(memory, deterministic)
                x_BTD = layer(x_BTD, kv, self_mask, cross_mask, deterministic)
                continue
            x_BTD, layer_cache = layer(
                x_BTD,
                cache["cross"][i],
                self_mask,
                cross_mask,
                deterministic,
                cache["self"][i],
                cache_index,
            )
            new_self.append(layer_cache)
        return x_BTD, tuple(new_self)

    def _scanned(self, x_BTD, memory, cache, cache_index, masks):
        """One `nn.scan` over the stacked layers; a cache is stacked for the scan and
        unstacked after it (cache leaves keep the batch on axis 0)."""
        self_mask, cross_mask, deterministic = masks
        count = self.config.decoder_layers

        def body(layer, x_BTD, xs):
            if xs is None:
                kv = layer.cross_key_values(memory, deterministic)
                return layer(x_BTD, kv, self_mask, cross_mask, deterministic), None
            kv, own = xs
            return layer(x_BTD, kv, self_mask, cross_mask, deterministic, own, cache_index)

        xs = None if cache is None else (_stacked(cache["cross"]), _stacked(cache["self"]))
        x_BTD, ys = layers.scan_layers(body, count)(self.layers, x_BTD, xs)
        return x_BTD, () if cache is None else _unstacked(ys, count)
