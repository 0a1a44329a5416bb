"""`MarianConfig`: the hyper-parameters of Marian encoder-decoders (HF `model_type` marian),
read from an HF config.json, with our extensions for Marian-native (Bergamot) models."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from finetune_jax.models import layers
from finetune_jax.models import lora as lora_lib

MODEL_TYPES = ("marian",)
ACTIVATION_AXES = ("batch", "length", "activation_embed")
# Our config.json extensions (absent: transformers' MarianMTModel behaviour, the first value).
DECODER_CELLS = ("attention", "ssru")
SINUSOID_LAYOUTS = ("hf", "marian")
START_EMBEDDINGS = ("token", "zeros")


@dataclasses.dataclass(frozen=True)
class MarianConfig:
    """Architecture hyper-parameters; field names follow HF's MarianConfig.

    Post-norm layers, fixed sinusoidal positions (computed, never params), token embeddings
    shared by encoder, decoder and the output head, plus a `final_logits_bias`.
    Extensions that Marian's own models (the Bergamot converter) set in config.json:

    - `decoder_cell`: "attention" (causal self-attention) or "ssru": each decoder layer's
      self-attention replaced by Marian's SSRU (simpler simple recurrent unit, Kim et al. 2019),
      whose state [B, D] is the decode cache;
    - `sinusoid_layout`: "hf" (transformers' MarianSinusoidalPositionalEmbedding: frequency
      10000^(-2i/D)) or "marian" (Marian's own: 10000^(-i/(D/2 - 1))); both put sin in the
      first half of the channels and cos in the second;
    - `start_embedding`: "token" (the first decoder position embeds `decoder_start_token_id`,
      as transformers does) or "zeros" (Marian: the first target position is a zero vector,
      whatever its id, before positions are added);
    - `layer_norm_eps`: transformers uses torch's 1e-5, Marian 1e-9.
    """

    vocab_size: int = 58101
    d_model: int = 512
    encoder_layers: int = 6
    encoder_attention_heads: int = 8
    encoder_ffn_dim: int = 2048
    decoder_layers: int = 6
    decoder_attention_heads: int = 8
    decoder_ffn_dim: int = 2048
    activation_function: str = "gelu"
    max_position_embeddings: int = 1024
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5
    init_std: float = 0.02
    pad_token_id: int | None = 58100
    eos_token_id: int | None = 0
    decoder_start_token_id: int | None = 58100
    decoder_cell: str = "attention"
    sinusoid_layout: str = "hf"
    start_embedding: str = "token"
    model_type: str = "marian"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the params
    remat: str = "none"  # none | full | dots_saveable (see layers.remat)
    attention_impl: str | None = None  # jax.nn.dot_product_attention: None (XLA) or "cudnn"
    lora: lora_lib.LoraConfig | None = None  # LoRA on the DenseND kernels its targets match
    scan_layers: bool = False  # encoder and decoder layers each one nn.scan (stacked params)

    def __post_init__(self) -> None:
        layers.get_activation(self.activation_function)  # fail at config time, not mid-trace
        for field, allowed in (
            ("decoder_cell", DECODER_CELLS),
            ("sinusoid_layout", SINUSOID_LAYOUTS),
            ("start_embedding", START_EMBEDDINGS),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(
                    f"config.json {field}={getattr(self, field)!r} is not one of {allowed}"
                )
        for name, heads in (
            ("encoder", self.encoder_attention_heads),
            ("decoder", self.decoder_attention_heads),
        ):
            if self.d_model % heads:
                raise ValueError(
                    f"d_model {self.d_model} is not divisible by {name}_attention_heads {heads}"
                )
        if self.d_model % 2:
            raise ValueError(f"d_model {self.d_model}: sinusoidal positions need an even width")

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> MarianConfig:
        """Builds a config from an HF config.json dict; unknown HF keys are ignored.

        HF's "dtype" (how the checkpoint was stored) is not our compute dtype, so it is
        skipped. Separate encoder / decoder vocabularies and an untied output head are
        refused: every Marian checkpoint this family serves shares one embedding.
        """
        model_type = hf_config.get("model_type", "marian")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
        for key in ("share_encoder_decoder_embeddings", "tie_word_embeddings"):
            if not hf_config.get(key, True):
                raise ValueError(
                    f"config.json {key}=false: the marian family supports one embedding "
                    "shared by encoder, decoder and output head only"
                )
        decoder_vocab = hf_config.get("decoder_vocab_size")
        if decoder_vocab not in (None, hf_config.get("vocab_size", cls.vocab_size)):
            raise ValueError(
                f"config.json decoder_vocab_size={decoder_vocab} differs from vocab_size: "
                "separate target vocabularies are not supported"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf_config.items() if k in names and k != "dtype"}
        if isinstance(kwargs.get("eos_token_id"), list):  # generation may list several
            kwargs["eos_token_id"] = kwargs["eos_token_id"][0]
        kwargs.update(overrides)
        return cls(**kwargs)
