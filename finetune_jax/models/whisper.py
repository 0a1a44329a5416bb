"""Whisper encoder-decoder (HF `model_type` whisper): the speech-recognition head, init and
family.

Encoder: two 1-D convolutions with GELU over log-mel frames (the second strided by 2), fixed
sinusoidal positions, pre-norm layers, final LayerNorm. Decoder: token + learned position
embeddings, pre-norm layers of causal self-attention, cross-attention over the encoder output
(the "memory") and a GELU MLP, final LayerNorm; logits come from the token embedding
(HF's `proj_out` is tied to it). Whisper's k_proj has no bias. Config: `whisper_config.py`;
layers, encoder and decoder: `whisper_blocks.py`; HF layout: `whisper_hf.py`; parity with
transformers: tests/test_whisper.py.

The encoder-decoder head (`WhisperForConditionalGeneration`, the "speech_recognition" kind's)
has the methods the train step and a generation loop call; another encoder-decoder family
(T5, BART, Marian) provides the same:

- `__call__(<encoder inputs>, decoder_input_ids, decoder_attention_mask=None,
  deterministic=True, return_hidden=False)`: teacher forcing, float32 logits [B, T, V]
  (or the decoder's final hidden state [B, T, D]);
- `encode(<encoder inputs>) -> memory [B, S, D]` (Whisper: `input_features` [B, mel, frames]
  as transformers' WhisperFeatureExtractor makes them; a text model: `input_ids`,
  `attention_mask`, whose mask is then the `memory_mask` of `decode`);
- `init_cache(memory, slots) -> cache`: every decoder layer's cross-attention K/V of the
  memory, computed once, and empty self-attention K/V of `slots` positions;
- `decode(decoder_input_ids, memory=None, memory_mask=None, decoder_attention_mask=None,
  positions=None, deterministic=True, cache=None, cache_index=None, last_logits_only=False,
  return_hidden=False)`: without a cache, the decoder over `memory`; with one, the T tokens
  are written at slots `cache_index ...` (as `LlamaForCausalLM`) and (logits, new cache) is
  returned. Every cache leaf has the batch on axis 0, so beam search reorders it with one
  `jax.tree.map(lambda x: x[beam_rows], cache)`;
- `logits_from_hidden(hidden) -> float32 logits` (the chunked LM loss applies it per chunk).

Encoder positions are not params: the sinusoids are computed (`sinusoids`), the values
HF keeps in its frozen `encoder.embed_positions`, so full fine-tuning cannot move them; a
checkpoint's copy of that table is not read. An input shorter than the 30 s window
(`max_source_positions`) uses the first positions, so short clips need not be padded.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax.models import whisper_hf
from finetune_jax.models.family import HeadSpec, ModelFamily
from finetune_jax.models.whisper_blocks import (
    WhisperDecoder,
    WhisperEncoder,
    decoder_outputs,
    sinusoids,
)
from finetune_jax.models.whisper_config import MODEL_TYPES, WhisperConfig

__all__ = ["FAMILY", "WhisperForConditionalGeneration", "init_params", "sinusoids"]


class WhisperModel(nn.Module):
    """The encoder and decoder, under `model/` as in HF's `model.encoder` / `model.decoder`."""

    config: WhisperConfig

    def setup(self) -> None:
        self.encoder = WhisperEncoder(self.config)
        self.decoder = WhisperDecoder(self.config)


class WhisperForConditionalGeneration(nn.Module):
    """The encoder-decoder head: see the module docstring for its methods and arguments."""

    config: WhisperConfig

    def setup(self) -> None:
        # setup, not compact: encode / decode / logits_from_hidden reach the same params.
        self.model = WhisperModel(self.config)

    def __call__(
        self,
        input_features,
        decoder_input_ids,
        decoder_attention_mask=None,
        deterministic=True,
        return_hidden=False,
    ):
        """Teacher forcing: float32 logits [B, T, V] (hidden [B, T, D] with return_hidden)."""
        memory_BSD = self.encode(input_features, deterministic)
        return self.decode(
            decoder_input_ids,
            memory_BSD,
            decoder_attention_mask=decoder_attention_mask,
            deterministic=deterministic,
            return_hidden=return_hidden,
        )

    def encode(self, input_features, deterministic=True):
        """log-mel features [B, mel, frames] -> memory [B, ceil(frames / 2), D]."""
        return self.model.encoder(input_features, deterministic)

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
        """Decoder outputs over `memory` or a cache; see the module docstring.

        With a cache, `decoder_attention_mask` is [B, slots] (valid slots), as for
        `LlamaForCausalLM`; positions default to the slot indices.
        """
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
        """Final hidden state [B, T, D] (any T) -> float32 logits [B, T, V] (tied head)."""
        del deterministic  # the tied head has no dropout; kept for the head interface
        return self.model.decoder.attend_embedding(x_BTD)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("head",))
def init_params(config: WhisperConfig, rng: jax.Array, head: type | None = None) -> dict[str, Any]:
    """Initialises WhisperForConditionalGeneration; returns the boxed (nn.Partitioned) params.

    For shapes and logical names without allocating:
    `jax.eval_shape(functools.partial(init_params, config), rng)`.
    """
    features = jnp.zeros((1, config.num_mel_bins, 4), jnp.float32)
    ids = jnp.zeros((1, 4), jnp.int32)
    module = (head or WhisperForConditionalGeneration)(config)
    return module.init({"params": rng}, features, ids)["params"]


FAMILY = ModelFamily(
    name="whisper",
    model_types=MODEL_TYPES,
    config_from_hf=WhisperConfig.from_hf,
    heads={
        "speech_recognition": HeadSpec(
            module=WhisperForConditionalGeneration,
            hf_class_suffix="ForConditionalGeneration",
            peft_task_type="SEQ_2_SEQ_LM",
        )
    },
    init=lambda head, config, rng: init_params(config, rng, head=head),
    backbone_mappings=whisper_hf.backbone_mappings,
    layer_pattern=r".*/layers_(\d+)/.*",
    lora_targets=r".*/(self_attn|encoder_attn)/(q_proj|v_proj)/kernel",
    # Every attention and MLP projection of the layers (not the convolutions).
    quantize_targets=r".*/layers_\d+/((self_attn|encoder_attn)/(q|k|v|out)_proj|fc1|fc2)/kernel",
    dropout_keys=("dropout",),
    strict=True,  # every tensor of the checkpoint has a place; others mean a mismatch
    # The frozen sinusoid table (computed here, see `sinusoids`) and a saved copy of the
    # tied proj_out, which is the token embedding.
    ignored_tensors=(whisper_hf.POSITIONS_KEY, "proj_out.weight"),
    constant_tensors=lambda config: {
        whisper_hf.POSITIONS_KEY: sinusoids(config.max_source_positions, config.d_model)
    },
    hf_class_names={"whisper": "Whisper"},
)
