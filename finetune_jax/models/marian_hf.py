"""Where each param of the marian models sits in an HF checkpoint, as `HFMapping` rows (data).

HF's `MarianMTModel` keys: `model.shared.weight` (the one token embedding; transformers saves
no copy of its tied `model.encoder.embed_tokens`, `model.decoder.embed_tokens` and `lm_head`,
older files may: ignored), `model.encoder.layers.*`, `model.decoder.layers.*` and
`final_logits_bias` [1, V]. The sinusoid tables are computed, never read.

An SSRU decoder (`decoder_cell: ssru`, which transformers cannot run) keeps the same layout;
its layers hold, instead of `self_attn.*` and `self_attn_layer_norm.*`:

- `model.decoder.layers.{i}.ssru.x_proj.weight` [D, D] (torch Linear [out, in], Marian's
  `decoder_l{i+1}_rnn_W` transposed),
- `model.decoder.layers.{i}.ssru.forget_proj.weight` [D, D] and `.bias` [D] (`..._rnn_Wf`,
  `..._rnn_bf`),
- `model.decoder.layers.{i}.ssru_layer_norm.weight` / `.bias` (`..._rnn_ffn_ln_scale` /
  `_bias`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune_jax.models.hf_mapping import (
    HFMapping,
    attention_rows,
    block_rows,
    linear_rows,
)

if TYPE_CHECKING:
    from finetune_jax.models.marian_config import MarianConfig

# Tensors some files carry that no param reads: the position tables (computed) and copies of
# the shared embedding.
IGNORED_TENSORS = ("embed_positions.weight", "embed_tokens.weight", "lm_head.weight")


def _encoder_layer(i: int, config: MarianConfig) -> list[HFMapping]:
    d, hf, ours = config.d_model, f"model.encoder.layers.{i}", f"model/encoder/layers_{i}"
    heads = config.encoder_attention_heads
    rows = attention_rows(f"{hf}.self_attn", f"{ours}/self_attn", d, heads, key_bias=True)
    norms = ("self_attn_layer_norm", "final_layer_norm")
    return rows + block_rows(hf, ours, d, config.encoder_ffn_dim, norms)


def _decoder_layer(i: int, config: MarianConfig) -> list[HFMapping]:
    d, hf, ours = config.d_model, f"model.decoder.layers.{i}", f"model/decoder/layers_{i}"
    heads = config.decoder_attention_heads
    if config.decoder_cell == "ssru":
        rows = linear_rows(f"{hf}.ssru.x_proj", f"{ours}/ssru/x_proj", d, d, (d, d), None)
        rows += linear_rows(
            f"{hf}.ssru.forget_proj", f"{ours}/ssru/forget_proj", d, d, (d, d), (d,)
        )
        first_norm = "ssru_layer_norm"
    else:
        rows = attention_rows(f"{hf}.self_attn", f"{ours}/self_attn", d, heads, key_bias=True)
        first_norm = "self_attn_layer_norm"
    rows += attention_rows(f"{hf}.encoder_attn", f"{ours}/encoder_attn", d, heads, key_bias=True)
    norms = (first_norm, "encoder_attn_layer_norm", "final_layer_norm")
    return rows + block_rows(hf, ours, d, config.decoder_ffn_dim, norms)


def backbone_mappings(config: MarianConfig) -> list[HFMapping]:
    """Every param of the encoder-decoder (the output head is the shared embedding): full
    paths and full HF keys, one row per layer."""
    v, d = config.vocab_size, config.d_model
    rows = [HFMapping("model.shared.weight", "model/shared/embedding", (v, d), (v, d))]
    for i in range(config.encoder_layers):
        rows += _encoder_layer(i, config)
    for i in range(config.decoder_layers):
        rows += _decoder_layer(i, config)
    return rows


def head_mappings(config: MarianConfig) -> list[HFMapping]:
    """The translation head's own param: `final_logits_bias` (HF [1, V], ours [V])."""
    v = config.vocab_size
    return [HFMapping("final_logits_bias", "final_logits_bias", (1, v), (v,))]


def layer_stacks(config: MarianConfig) -> dict[str, int]:
    """Stacked layer params of the scanned layout: encoder and decoder layers."""
    if not config.scan_layers:
        return {}
    return {
        "model/encoder/layers": config.encoder_layers,
        "model/decoder/layers": config.decoder_layers,
    }
