"""`WhisperConfig`: the hyper-parameters of Whisper encoder-decoders, read from an HF config.json."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from finetune_jax.models import layers
from finetune_jax.models import lora as lora_lib

MODEL_TYPES = ("whisper",)
ACTIVATION_AXES = ("batch", "length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class WhisperConfig:
    """Architecture hyper-parameters; field names follow HF's WhisperConfig.

    `max_source_positions` is the encoder's window in positions (1500 = 30 s of audio at
    100 mel frames per second, halved by the strided conv); shorter inputs use the first
    positions. `max_target_positions` is the decoder's learned position table length.
    """

    vocab_size: int = 51865
    num_mel_bins: int = 80
    d_model: int = 384
    encoder_layers: int = 4
    encoder_attention_heads: int = 6
    encoder_ffn_dim: int = 1536
    decoder_layers: int = 4
    decoder_attention_heads: int = 6
    decoder_ffn_dim: int = 1536
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    max_target_positions: int = 448
    dropout: float = 0.0
    attention_dropout: float = 0.0
    activation_dropout: float = 0.0
    scale_embedding: bool = False
    layer_norm_eps: float = 1e-5  # torch nn.LayerNorm's default, which HF Whisper uses
    init_std: float = 0.02
    pad_token_id: int | None = 50256
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    decoder_start_token_id: int | None = 50257
    model_type: str = "whisper"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the params
    remat: str = "none"  # none | full | dots_saveable (see layers.remat)
    attention_impl: str | None = None  # jax.nn.dot_product_attention: None (XLA) or "cudnn"
    lora: lora_lib.LoraConfig | None = None  # LoRA on the DenseND kernels its targets match
    scan_layers: bool = False  # not supported yet: a clear error rather than a silent no-op

    def __post_init__(self) -> None:
        layers.get_activation(self.activation_function)  # fail at config time, not mid-trace
        for name, heads in (
            ("encoder", self.encoder_attention_heads),
            ("decoder", self.decoder_attention_heads),
        ):
            if self.d_model % heads:
                raise ValueError(
                    f"d_model {self.d_model} is not divisible by {name}_attention_heads {heads}"
                )
        if self.scan_layers:
            raise ValueError(
                "model.scan_layers=True is not supported by the whisper family yet; "
                "set model.scan_layers=False (its 4-32 layers compile quickly unrolled)"
            )

    @property
    def max_source_frames(self) -> int:
        """Mel frames of the full encoder window (the conv stem halves them)."""
        return 2 * self.max_source_positions

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> WhisperConfig:
        """Builds a config from an HF config.json dict; unknown HF keys are ignored.

        HF's "dtype" (how the checkpoint was stored) is not our compute dtype, so it is
        skipped. An untied output projection does not exist in HF Whisper (`proj_out` is
        always the token embedding), so `tie_word_embeddings: false` is refused.
        """
        model_type = hf_config.get("model_type", "whisper")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not one of {MODEL_TYPES}")
        if not hf_config.get("tie_word_embeddings", True):
            raise ValueError("tie_word_embeddings=False: Whisper's proj_out is always tied")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf_config.items() if k in names and k != "dtype"}
        kwargs.update(overrides)
        return cls(**kwargs)
