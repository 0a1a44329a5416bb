"""Marian encoder-decoder (HF `model_type` marian): the translation head, init and family.

Transformers' MarianMTModel: post-norm encoder and decoder layers (self-attention, the
decoder's cross-attention over the encoder output, and an MLP, each followed by residual +
LayerNorm), fixed sinusoidal positions, token embeddings (scaled by sqrt(D) with
`scale_embedding`) shared by encoder, decoder and the output head, plus a
`final_logits_bias`. Marian's own models (the Bergamot ones that `hf/marian_conversion.py`
converts) add an SSRU decoder cell, Marian's sinusoid table and a zero start embedding (see
`MarianConfig`). Config: `marian_config.py`; layers, encoder and decoder: `marian_blocks.py`;
HF layout: `marian_hf.py`; parity with transformers: tests/test_marian.py.

The head (`MarianMTModel`, the "translation" kind's) has the encoder-decoder methods
spelled out in `models/whisper.py`'s docstring, with text inputs:

- `__call__(input_ids, attention_mask, decoder_input_ids, decoder_attention_mask=None,
  deterministic=True, return_hidden=False)` (transformers' order; `attention_mask` None: no
  source padding): teacher forcing, float32 logits [B, T, V];
- `encode(input_ids, attention_mask=None, deterministic=True) -> memory [B, S, D]` (the
  `attention_mask` is then `decode`'s `memory_mask`);
- `init_cache(memory, slots)`: cross-attention K/V per layer once, and empty self-attention
  K/V of `slots` positions (or, for an SSRU decoder, the zero recurrent state [B, D]);
- `decode(decoder_input_ids, memory=None, memory_mask=None, decoder_attention_mask=None,
  positions=None, deterministic=True, cache=None, cache_index=None, last_logits_only=False,
  return_hidden=False)`; with a cache, (logits, new cache). An SSRU cache holds the state
  after the tokens fed so far, so a cached decode must feed every token once, in order
  (prefill then steps, as the decode loops do); `cache_index` then only sets the positions;
- `logits_from_hidden(hidden) -> float32 logits` (the tied head plus `final_logits_bias`).

The first decoder input is `decoder_start_token_id` (the pad id in Marian checkpoints); with
`start_embedding: zeros` its embedding is replaced by zeros whatever the id.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax.models import layers, marian_hf
from finetune_jax.models.family import HeadSpec, ModelFamily
from finetune_jax.models.marian_blocks import MarianDecoder, MarianEncoder
from finetune_jax.models.marian_config import MODEL_TYPES, MarianConfig
from finetune_jax.models.whisper_blocks import decoder_outputs

__all__ = ["FAMILY", "MarianMTModel", "init_params"]


class MarianModel(nn.Module):
    """The shared embedding, encoder and decoder (HF's `model.shared` / `.encoder` /
    `.decoder`); the embedding's params live once, under `model/shared`."""

    config: MarianConfig

    def setup(self) -> None:
        cfg = self.config
        self.shared = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=layers.normal_init(cfg.init_std, ("vocab", "embed")),
        )
        self.encoder = MarianEncoder(cfg, self.shared)
        self.decoder = MarianDecoder(cfg, self.shared)


class MarianMTModel(nn.Module):
    """The translation head: see the module docstring for its methods and arguments."""

    config: MarianConfig

    def setup(self) -> None:
        # setup, not compact: encode / decode / logits_from_hidden reach the same params.
        cfg = self.config
        self.model = MarianModel(cfg)
        self.final_logits_bias = self.param(
            "final_logits_bias", layers.zeros_init(("vocab",)), (cfg.vocab_size,), cfg.param_dtype
        )

    def __call__(
        self,
        input_ids,
        attention_mask,
        decoder_input_ids,
        decoder_attention_mask=None,
        deterministic=True,
        return_hidden=False,
    ):
        """Teacher forcing: float32 logits [B, T, V] (hidden [B, T, D] with return_hidden)."""
        memory_BSD = self.encode(input_ids, attention_mask, deterministic)
        return self.decode(
            decoder_input_ids,
            memory_BSD,
            attention_mask,
            decoder_attention_mask,
            deterministic=deterministic,
            return_hidden=return_hidden,
        )

    def encode(self, input_ids, attention_mask=None, deterministic=True):
        """Source ids [B, S] (and their 0/1 mask) -> memory [B, S, D]."""
        return self.model.encoder(input_ids, attention_mask, deterministic)

    def init_cache(self, memory, slots: int):
        """A decoding cache for `slots` decoder positions over `memory` (cross K/V once)."""
        return self.model.decoder.init_cache(memory, slots)

    def decode(
        self,
        decoder_input_ids,
        memory=None,
        memory_mask=None,
        decoder_attention_mask=None,
        positions=None,
        deterministic=True,
        cache=None,
        cache_index=None,
        last_logits_only=False,
        return_hidden=False,
    ):
        """Decoder outputs over `memory` or a cache; see the module docstring."""
        args = (
            decoder_input_ids,
            memory,
            memory_mask,
            decoder_attention_mask,
            positions,
            deterministic,
            cache,
            cache_index,
        )
        return decoder_outputs(self, args, last_logits_only, return_hidden)

    def logits_from_hidden(self, x_BTD, deterministic=True):
        """Final hidden state [B, T, D] (any T) -> float32 logits [B, T, V]: the shared
        embedding as output projection, plus `final_logits_bias`."""
        del deterministic  # the tied head has no dropout; kept for the head interface
        cfg = self.config
        logits_BTV = jnp.einsum(
            "btd,vd->btv",
            x_BTD.astype(cfg.dtype),
            self.model.shared.embedding.astype(cfg.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits_BTV + self.final_logits_bias.astype(jnp.float32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("head",))
def init_params(config: MarianConfig, rng: jax.Array, head: type | None = None) -> dict[str, Any]:
    """Initialises MarianMTModel; returns the boxed (nn.Partitioned) params.

    For shapes and logical names without allocating:
    `jax.eval_shape(functools.partial(init_params, config), rng)`.
    """
    ids = jnp.zeros((1, 4), jnp.int32)
    module = (head or MarianMTModel)(config)
    return module.init({"params": rng}, ids, None, ids)["params"]


FAMILY = ModelFamily(
    name="marian",
    model_types=MODEL_TYPES,
    config_from_hf=MarianConfig.from_hf,
    heads={
        "translation": HeadSpec(
            module=MarianMTModel,
            hf_rows=marian_hf.head_mappings,
            hf_class_suffix="MTModel",
            peft_task_type="SEQ_2_SEQ_LM",
        )
    },
    init=lambda head, config, rng: init_params(config, rng, head=head),
    backbone_mappings=marian_hf.backbone_mappings,
    layer_stacks=marian_hf.layer_stacks,
    layer_pattern=r".*/layers_(\d+)/.*",
    lora_targets=r".*/(self_attn|encoder_attn)/(q_proj|v_proj)/kernel",
    # Every attention and MLP projection of the layers (an SSRU cell's stay float).
    quantize_targets=r".*/layers_\d+/((self_attn|encoder_attn)/(q|k|v|out)_proj|fc1|fc2)/kernel",
    dropout_keys=("dropout",),
    # Checkpoints may leave out the bias (transformers: "ignore on load missing"): zeros.
    optional_params=("final_logits_bias",),
    strict=True,  # every tensor of the checkpoint has a place; others mean a mismatch
    ignored_tensors=marian_hf.IGNORED_TENSORS,
    hf_class_names={"marian": "Marian"},
)
