"""Whisper's building blocks: attention, encoder and decoder layers, the encoder and the
decoder, and the fixed encoder positions (`sinusoids`). The encoder-decoder head that joins them, its
init and the family are in `whisper.py`.

Param names mirror HF (`self_attn`, `encoder_attn`, `fc1`, `final_layer_norm`...) so the
mapping in `whisper_hf.py` is easy to audit. Logical axis names of the params: `vocab`,
`embed`, `heads`, `kv`, `mlp`, `position` (conv kernels' width and mel axes are unnamed:
replicated); activations are constrained to (`batch`, `length`, `activation_embed`).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.models import attention, layers
from finetune_jax.models.whisper_config import ACTIVATION_AXES, WhisperConfig


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's fixed encoder positions [length, channels] float32: sin(position x
    geometric frequencies) in the first half of the channels, cos in the second. A row
    depends on its position only, so a shorter window is a prefix of the full table."""
    if channels % 2:
        raise ValueError(f"sinusoidal positions need an even width, got {channels}")
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2, dtype=np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def dense(config: Any, features: int, names: tuple[str, str]) -> layers.DenseND:
    """A projection to `features` with `config`'s init, dtypes and LoRA (bias named names[1:])."""
    return layers.DenseND(
        features=(features,),
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=layers.normal_init(config.init_std, names),
        bias_init=layers.zeros_init(names[1:]),
        lora=config.lora,
    )


class WhisperAttention(nn.Module):
    """Multi-head attention with HF WhisperAttention's projections (no k bias unless
    `key_bias`, as BART-style models such as Marian have): encoder self-attention, causal
    decoder self-attention (optionally over a KV cache), or cross-attention over K/V computed
    from the memory (`key_values`). `config` needs d_model, init_std, dtype, param_dtype,
    lora, attention_dropout and attention_impl."""

    config: Any
    num_heads: int
    key_bias: bool = False

    def setup(self) -> None:
        cfg = self.config
        head_dim = cfg.d_model // self.num_heads

        def project(bias: bool) -> layers.DenseND:
            return layers.DenseND(
                features=(self.num_heads, head_dim),
                dtype=cfg.dtype,
                param_dtype=cfg.param_dtype,
                kernel_init=layers.normal_init(cfg.init_std, ("embed", "heads", "kv")),
                bias_init=layers.zeros_init(("heads", "kv")) if bias else None,
                lora=cfg.lora,
            )

        self.q_proj, self.k_proj, self.v_proj = (
            project(True),
            project(self.key_bias),
            project(True),
        )
        self.out_proj = layers.DenseND(
            features=(cfg.d_model,),
            in_axes=2,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=layers.normal_init(cfg.init_std, ("heads", "kv", "embed")),
            bias_init=layers.zeros_init(("embed",)),
            lora=cfg.lora,
        )
        self.probs_dropout = layers.Dropout(cfg.attention_dropout)

    def key_values(self, x_BSD, deterministic=True) -> dict[str, jax.Array]:
        """{"k", "v"} [B, S, N, H] of the S positions of x."""
        return {"k": self.k_proj(x_BSD, deterministic), "v": self.v_proj(x_BSD, deterministic)}

    def self_attention(
        self, x_BTD, mask=None, deterministic=True, causal=False, cache=None, cache_index=None
    ):
        """Attention of x over itself; with `cache` ({"k", "v"} [B, S, N, H]) this chunk's
        k, v are written at slots `cache_index ...`, all S slots are attended under `mask`
        ([B|1, 1, T, S], carrying causality) and (out, new cache) is returned."""
        q_BTNH = self.q_proj(x_BTD, deterministic)
        kv = self.key_values(x_BTD, deterministic)
        if cache is None:
            return self._attend(q_BTNH, kv, mask, causal, deterministic)
        start = (0, cache_index, 0, 0)
        kv = {
            name: jax.lax.dynamic_update_slice(
                cache[name], kv[name].astype(cache[name].dtype), start
            )
            for name in ("k", "v")
        }
        return self._attend(q_BTNH, kv, mask, False, deterministic), kv

    def cross_attention(self, x_BTD, kv, mask=None, deterministic=True):
        """Attention of x over memory K/V from `key_values` (mask [B, 1, 1, S] or None)."""
        return self._attend(self.q_proj(x_BTD, deterministic), kv, mask, False, deterministic)

    def _attend(self, q_BTNH, kv, mask, causal, deterministic):
        cfg = self.config
        k_BSNH, v_BSNH = kv["k"].astype(q_BTNH.dtype), kv["v"].astype(q_BTNH.dtype)
        if deterministic or cfg.attention_dropout == 0:
            out_BTNH = attention.attend(
                q_BTNH, k_BSNH, v_BSNH, mask, is_causal=causal, implementation=cfg.attention_impl
            )
        else:  # the fused kernel has no dropout on the probabilities: spell it out
            scale = q_BTNH.shape[-1] ** -0.5
            scores = jnp.einsum("btnh,bsnh->bnts", q_BTNH, k_BSNH).astype(jnp.float32) * scale
            keep = jnp.ones(scores.shape[-2:], bool)
            keep = jnp.tril(keep) if causal else keep
            keep = keep if mask is None else keep & mask
            probs = jax.nn.softmax(jnp.where(keep, scores, jnp.finfo(jnp.float32).min), axis=-1)
            probs = self.probs_dropout(probs, deterministic=False).astype(q_BTNH.dtype)
            out_BTNH = jnp.einsum("bnts,bsnh->btnh", probs, v_BSNH)
        return self.out_proj(out_BTNH, deterministic)


def feed_forward(module: nn.Module, x_BTD, deterministic: bool):
    """fc2(dropout(act(fc1(x)))) with the layer's `fc1`, `fc2` and `activation_dropout`."""
    h_BTF = layers.get_activation(module.config.activation_function)(module.fc1(x_BTD))
    h_BTF = module.activation_dropout(h_BTF, deterministic=deterministic)
    return module.fc2(h_BTF)


def decoder_outputs(head: nn.Module, decoder_args: tuple, last_logits_only, return_hidden):
    """What an encoder-decoder head's `decode` returns (the contract in `models/whisper.py`):
    `head.model.decoder(*decoder_args)` (input ids, memory, memory mask, decoder mask,
    positions, deterministic, cache, cache index), its last position only if asked, through
    `head.logits_from_hidden` unless `return_hidden`; with a cache, (result, new cache)."""
    deterministic, cache = decoder_args[5], decoder_args[6]
    out = head.model.decoder(*decoder_args)
    x_BTD, new_cache = (out, None) if cache is None else out
    if last_logits_only:
        x_BTD = x_BTD[:, -1:]
    result = x_BTD if return_hidden else head.logits_from_hidden(x_BTD, deterministic)
    return result if cache is None else (result, new_cache)


class WhisperEncoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    config: WhisperConfig

    def setup(self) -> None:
        cfg = self.config
        self.self_attn = WhisperAttention(cfg, cfg.encoder_attention_heads)
        self.self_attn_layer_norm = layers.layer_norm(cfg)
        self.fc1 = dense(cfg, cfg.encoder_ffn_dim, ("embed", "mlp"))
        self.fc2 = dense(cfg, cfg.d_model, ("mlp", "embed"))
        self.final_layer_norm = layers.layer_norm(cfg)
        self.dropout = layers.Dropout(cfg.dropout)
        self.activation_dropout = layers.Dropout(cfg.activation_dropout)

    def __call__(self, x_BSD, deterministic=True):
        h_BSD = self.self_attn.self_attention(self.self_attn_layer_norm(x_BSD), None, deterministic)
        x_BSD = x_BSD + self.dropout(h_BSD, deterministic=deterministic)
        h_BSD = feed_forward(self, self.final_layer_norm(x_BSD), deterministic)
        x_BSD = x_BSD + self.dropout(h_BSD, deterministic=deterministic)
        return nn.with_logical_constraint(x_BSD, ACTIVATION_AXES)


class WhisperEncoder(nn.Module):
    """Conv stem + sinusoidal positions + layers + final LayerNorm: memory [B, S, D] with
    S = ceil(frames / 2) <= max_source_positions."""

    config: WhisperConfig

    @nn.compact
    def __call__(self, input_features_BMF, deterministic=True):
        cfg = self.config
        _, mels, frames = input_features_BMF.shape
        if mels != cfg.num_mel_bins or frames > cfg.max_source_frames:
            raise ValueError(
                f"input_features of shape {input_features_BMF.shape}: expected [batch, "
                f"{cfg.num_mel_bins} mel bins, at most {cfg.max_source_frames} frames]"
            )
        conv = functools.partial(
            nn.Conv,
            cfg.d_model,
            kernel_size=(3,),
            padding=((1, 1),),
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            bias_init=layers.zeros_init(("embed",)),
        )
        act = layers.get_activation(cfg.activation_function)
        x_BFM = jnp.swapaxes(input_features_BMF, 1, 2).astype(cfg.dtype)
        x_BFD = act(
            conv(kernel_init=layers.normal_init(cfg.init_std, (None, None, "embed")), name="conv1")(
                x_BFM
            )
        )
        conv2 = conv(
            strides=(2,),
            kernel_init=layers.normal_init(cfg.init_std, (None, "embed", None)),
            name="conv2",
        )
        x_BSD = act(conv2(x_BFD))
        positions_SD = sinusoids(cfg.max_source_positions, cfg.d_model)[: x_BSD.shape[1]]
        x_BSD = x_BSD + jnp.asarray(positions_SD, cfg.dtype)
        x_BSD = layers.Dropout(cfg.dropout)(x_BSD, deterministic=deterministic)
        x_BSD = nn.with_logical_constraint(x_BSD, ACTIVATION_AXES)
        # static_argnums counts `self` as 0, so 2 is `deterministic` (a Python bool).
        block = layers.remat(WhisperEncoderLayer, cfg.remat, static_argnums=(2,))
        for i in range(cfg.encoder_layers):
            x_BSD = block(cfg, name=f"layers_{i}")(x_BSD, deterministic)
        return layers.layer_norm(cfg, "layer_norm")(x_BSD)


class WhisperDecoderLayer(nn.Module):
    """Pre-norm block: causal self-attention, cross-attention over the memory, then MLP."""

    config: WhisperConfig

    def setup(self) -> None:
        cfg = self.config
        self.self_attn = WhisperAttention(cfg, cfg.decoder_attention_heads)
        self.self_attn_layer_norm = layers.layer_norm(cfg)
        self.encoder_attn = WhisperAttention(cfg, cfg.decoder_attention_heads)
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
        """Returns x [B, T, D]; with `cache` (self-attention {"k", "v"}), (x, new cache)."""
        h_BTD = self.self_attn.self_attention(
            self.self_attn_layer_norm(x_BTD), self_mask, deterministic, True, cache, cache_index
        )
        if cache is not None:
            h_BTD, cache = h_BTD
        x_BTD = x_BTD + self.dropout(h_BTD, deterministic=deterministic)
        h_BTD = self.encoder_attn.cross_attention(
            self.encoder_attn_layer_norm(x_BTD), cross_kv, cross_mask, deterministic
        )
        x_BTD = x_BTD + self.dropout(h_BTD, deterministic=deterministic)
        h_BTD = feed_forward(self, self.final_layer_norm(x_BTD), deterministic)
        x_BTD = x_BTD + self.dropout(h_BTD, deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        return x_BTD if cache is None else (x_BTD, cache)


class WhisperDecoder(nn.Module):
    """Token + learned position embeddings, decoder layers, final LayerNorm."""

    config: WhisperConfig

    def setup(self) -> None:
        cfg = self.config
        embed = functools.partial(
            nn.Embed, features=cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype
        )
        self.embed_tokens = embed(
            cfg.vocab_size, embedding_init=layers.normal_init(cfg.init_std, ("vocab", "embed"))
        )
        self.embed_positions = embed(
            cfg.max_target_positions,
            embedding_init=layers.normal_init(cfg.init_std, ("position", "embed")),
        )
        # static_argnums counts `self` as 0, so 5 is `deterministic` (a Python bool).
        block = layers.remat(WhisperDecoderLayer, cfg.remat, static_argnums=(5,))
        self.layers = [block(cfg) for _ in range(cfg.decoder_layers)]
        self.layer_norm = layers.layer_norm(cfg)
        self.dropout = layers.Dropout(cfg.dropout)

    def _check_length(self, length: int, what: str) -> None:
        if length > self.config.max_target_positions:
            raise ValueError(
                f"{what} of {length} decoder positions is longer than the model's "
                f"max_target_positions={self.config.max_target_positions}"
            )

    def init_cache(self, memory_BSD, slots: int, deterministic=True) -> dict[str, Any]:
        """{"self": per layer empty {"k", "v"} [B, slots, N, H], "cross": per layer the
        memory's {"k", "v"} [B, S, N, H]}, in the compute dtype."""
        cfg = self.config
        self._check_length(slots, "A cache")
        heads = cfg.decoder_attention_heads
        zeros = jnp.zeros((memory_BSD.shape[0], slots, heads, cfg.d_model // heads), cfg.dtype)
        return {
            "self": tuple({"k": zeros, "v": zeros} for _ in self.layers),
            "cross": tuple(
                layer.cross_key_values(memory_BSD, deterministic) for layer in self.layers
            ),
        }

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
        length = input_ids.shape[1]
        if (memory is None) == (cache is None):
            raise ValueError(
                "decode takes either memory (the encoder output) or a cache from init_cache "
                "(which holds the memory's K/V), not both and not neither"
            )
        if cache is None:
            self._check_length(length, "A decoder input")
            cross = [layer.cross_key_values(memory, deterministic) for layer in self.layers]
            self_mask, start = attention.attention_mask(attention_mask, None, length), 0
        else:
            cross, cache_index = cache["cross"], 0 if cache_index is None else cache_index
            slots = cache["self"][0]["k"].shape[1]
            self_mask = attention.cache_attention_mask(attention_mask, cache_index, length, slots)
            start = cache_index
        if positions is None:
            positions = jnp.broadcast_to(start + jnp.arange(length), input_ids.shape)
        cross_mask = None if memory_mask is None else memory_mask.astype(bool)[:, None, None, :]
        x_BTD = self.embed_tokens(input_ids)
        if self.config.scale_embedding:
            x_BTD = x_BTD * jnp.asarray(self.config.d_model**0.5, x_BTD.dtype)
        x_BTD = self.dropout(x_BTD + self.embed_positions(positions), deterministic=deterministic)
        x_BTD = nn.with_logical_constraint(x_BTD, ACTIVATION_AXES)
        new_self = []
        for i, layer in enumerate(self.layers):
            if cache is None:
                x_BTD = layer(x_BTD, cross[i], self_mask, cross_mask, deterministic)
            else:
                x_BTD, layer_cache = layer(
                    x_BTD,
                    cross[i],
                    self_mask,
                    cross_mask,
                    deterministic,
                    cache["self"][i],
                    cache_index,
                )
                new_self.append(layer_cache)
        x_BTD = self.layer_norm(x_BTD)
        return x_BTD if cache is None else (x_BTD, {"self": tuple(new_self), "cross": cross})

    def attend_embedding(self, x_BTD):
        """Tied output head: float32 logits = x @ embedding.T (inputs in the compute dtype)."""
        return jnp.einsum(
            "btd,vd->btv",
            x_BTD.astype(self.config.dtype),
            self.embed_tokens.embedding.astype(self.config.dtype),
            preferred_element_type=jnp.float32,
        )
