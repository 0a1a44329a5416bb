"""Where each param of the whisper models sits in an HF checkpoint, as `HFMapping` rows (data).

HF's `WhisperForConditionalGeneration` keys: `model.encoder.*`, `model.decoder.*` and a
`proj_out.weight` tied to `model.decoder.embed_tokens.weight` (no row: our head reads the
embedding). `model.encoder.embed_positions.weight` is the fixed sinusoid table, which our
encoder computes instead of reading. Conv weights are torch [out, in, width]; a Flax conv
kernel is [width, in, out], which is the full axis reversal that `transpose` applies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune_jax.models.hf_mapping import HFMapping, attention_rows, block_rows, layer_norm_rows

if TYPE_CHECKING:
    from finetune_jax.models.whisper_config import WhisperConfig

# HF's frozen encoder sinusoid table: computed by our encoder, written on export.
POSITIONS_KEY = "model.encoder.embed_positions.weight"


def encoder_mappings(config: WhisperConfig) -> list[HFMapping]:
    """HF `model.encoder.*` tensors (keys without `model.encoder.`) -> our encoder subtree."""
    d, mels = config.d_model, config.num_mel_bins
    rows = [
        HFMapping("conv1.weight", "conv1/kernel", (d, mels, 3), (3, mels, d), True),
        HFMapping("conv1.bias", "conv1/bias", (d,), (d,)),
        HFMapping("conv2.weight", "conv2/kernel", (d, d, 3), (3, d, d), True),
        HFMapping("conv2.bias", "conv2/bias", (d,), (d,)),
    ]
    for i in range(config.encoder_layers):
        hf, ours = f"layers.{i}", f"layers_{i}"
        rows += attention_rows(
            f"{hf}.self_attn", f"{ours}/self_attn", d, config.encoder_attention_heads
        )
        norms = ("self_attn_layer_norm", "final_layer_norm")
        rows += block_rows(hf, ours, d, config.encoder_ffn_dim, norms)
    return rows + layer_norm_rows("layer_norm", "layer_norm", d)


def decoder_mappings(config: WhisperConfig) -> list[HFMapping]:
    """HF `model.decoder.*` tensors (keys without `model.decoder.`) -> our decoder subtree."""
    d, v, p = config.d_model, config.vocab_size, config.max_target_positions
    rows = [
        HFMapping("embed_tokens.weight", "embed_tokens/embedding", (v, d), (v, d)),
        HFMapping("embed_positions.weight", "embed_positions/embedding", (p, d), (p, d)),
    ]
    heads = config.decoder_attention_heads
    for i in range(config.decoder_layers):
        hf, ours = f"layers.{i}", f"layers_{i}"
        rows += attention_rows(f"{hf}.self_attn", f"{ours}/self_attn", d, heads)
        rows += attention_rows(f"{hf}.encoder_attn", f"{ours}/encoder_attn", d, heads)
        norms = ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
        rows += block_rows(hf, ours, d, config.decoder_ffn_dim, norms)
    return rows + layer_norm_rows("layer_norm", "layer_norm", d)


def backbone_mappings(config: WhisperConfig) -> list[HFMapping]:
    """Every param of WhisperForConditionalGeneration (its LM head is the tied token
    embedding): full paths and full HF keys."""
    rows = []
    for part, mappings in (("encoder", encoder_mappings), ("decoder", decoder_mappings)):
        rows += [
            m._replace(hf_key=f"model.{part}.{m.hf_key}", path=f"model/{part}/{m.path}")
            for m in mappings(config)
        ]
    return rows
