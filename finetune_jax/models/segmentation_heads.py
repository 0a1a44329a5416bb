"""Semantic-segmentation heads on a ViT's patch tokens, and the task model around them.

`PatchSegmenter` runs a backbone (`vit.ViTModel`, under its HF prefix `dinov2/` or `vit/`) to
the last `segmentation_layers` blocks, each through the final LayerNorm (DINOv2's
`get_intermediate_layers(norm=True)`), and lays their patch tokens out as a grid
[B, H/p, W/p, F]: per layer [patch token, CLS token] (CLS when `segmentation_cls_token`),
layers oldest first, concatenated (DINOv2's linear-head feature order). Its head
(`segmentation_head`) maps the grid to float32 logits [B, H, W, classes]:

- "linear": DINOv2's linear protocol: one linear classifier per patch, its logits upsampled
  bilinearly to the image (half-pixel centres, torch's `align_corners=False`).
- "decoder": the linear head's per-patch scores (`patch_classifier`, upsampled) plus a light
  decoder's: a 1x1 projection to `decoder_channels` + GELU, two stages of (x2 bilinear
  upsampling, 3x3 conv, LayerNorm over channels (eps 1e-6), GELU) halving the width, then
  upsampled to the image and fused (3x3 conv, GELU) with a 3x3 conv (+ GELU) of the input
  pixels, a full-resolution branch the ViT lacks (its finest features are 14 px patches),
  before a 1x1 classifier. GELU is the exact (erf) one, torch's default.

Every head param lives under `segmentation_head/`; `hf_rows` gives its torch layout (Linear
[out, in]; Conv2d [out, in, kh, kw], stored here as [kw, kh, in, out] so that one transpose
maps it) for the `segmentation_head.safetensors` an export writes beside the backbone.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax.models import layers
from finetune_jax.models.hf_mapping import HFMapping

HEADS = ("linear", "decoder")
NORM_EPSILON = 1e-6  # the decoder's LayerNorms (torch's default is 1e-5: say so on export)
HEAD = "segmentation_head"
IMAGE_CHANNELS = 16  # width of the decoder's full-resolution pixel branch and fusion
STAGES = 2  # x2 upsampling stages of the decoder


def gelu(x):
    """The exact (erf) GELU, torch's `nn.GELU()` default."""
    return jax.nn.gelu(x, approximate=False)


def _replicated(init, rank: int):
    """`init` with no sharding (the head is small): logical name None on every axis."""
    return nn.with_logical_partitioning(init, (None,) * rank)


class Conv3x3(nn.Module):
    """A 3x3, stride 1, zero-padded convolution, NHWC; kernel [kw, kh, in, out] (torch's
    Conv2d weight [out, in, kh, kw] reversed)."""

    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BHWC):
        init = nn.initializers.variance_scaling(2.0, "fan_in", "truncated_normal")
        shape = (3, 3, x_BHWC.shape[-1], self.features)
        kernel = self.param("kernel", _replicated(init, 4), shape, self.param_dtype)
        zeros = _replicated(nn.initializers.zeros, 1)
        bias = self.param("bias", zeros, (self.features,), self.param_dtype)
        y = jax.lax.conv_general_dilated(
            x_BHWC,
            kernel.astype(jnp.float32),
            window_strides=(1, 1),
            padding="SAME",
            dimension_numbers=("NHWC", "WHIO", "NHWC"),
        )
        return y + bias.astype(jnp.float32)


def _dense(features: int, name: str, param_dtype: Any) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        kernel_init=_replicated(nn.initializers.variance_scaling(2.0, "fan_in", "normal"), 2),
        bias_init=_replicated(nn.initializers.zeros, 1),
        name=name,
    )


def _upsample(x_BHWC, height: int, width: int):
    """Bilinear resize to height x width (half-pixel centres, as torch's align_corners=False
    when enlarging)."""
    batch, _, _, channels = x_BHWC.shape
    return jax.image.resize(x_BHWC, (batch, height, width, channels), "bilinear")


class LinearHead(nn.Module):
    """Per-patch logits, upsampled to the image."""

    config: Any

    @nn.compact
    def __call__(self, features_BhwF, pixels_BHWC):
        cfg = self.config
        classify = layers.classifier(cfg.num_labels, cfg.param_dtype, cfg.initializer_range)
        _, height, width, _ = pixels_BHWC.shape
        return _upsample(classify(features_BhwF), height, width)


class DecoderHead(nn.Module):
    """Per-patch scores (the linear protocol's) + a refinement: projection, two upsampling
    conv stages, a full-resolution pixel branch, classifier; the two score maps summed."""

    config: Any

    @nn.compact
    def __call__(self, features_BhwF, pixels_BHWC):
        cfg = self.config
        dtype = cfg.param_dtype
        # The patch scores carry the classes from the first step, as the linear head does;
        # the decoder learns the boundaries on top (FCN's sum of score maps across strides).
        patch_scores = _dense(cfg.num_labels, "patch_classifier", dtype)(features_BhwF)
        x = gelu(_dense(cfg.decoder_channels, "project", dtype)(features_BhwF))
        for stage in range(STAGES):
            _, h, w, _ = x.shape
            x = _upsample(x, 2 * h, 2 * w)
            x = Conv3x3(cfg.decoder_channels // 2 ** (stage + 1), dtype, name=f"stage_{stage}")(x)
            x = gelu(_layer_norm(dtype, f"norm_{stage}")(x))
        _, height, width, _ = pixels_BHWC.shape
        image = gelu(Conv3x3(IMAGE_CHANNELS, dtype, name="image_conv")(pixels_BHWC))
        x = jnp.concatenate([_upsample(x, height, width), image.astype(jnp.float32)], axis=-1)
        x = gelu(Conv3x3(IMAGE_CHANNELS, dtype, name="fuse")(x))
        refined = _dense(cfg.num_labels, "classifier", dtype)(x)
        return _upsample(patch_scores, height, width) + refined


def _layer_norm(param_dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=NORM_EPSILON,
        dtype=jnp.float32,
        param_dtype=param_dtype,
        scale_init=_replicated(nn.initializers.ones, 1),
        bias_init=_replicated(nn.initializers.zeros, 1),
        name=name,
    )


HEAD_MODULES = {"linear": LinearHead, "decoder": DecoderHead}


def patch_grid(hidden_KBLD, rows: int, cols: int, cls_token: bool):
    """[B, rows, cols, F] float32 from the K layers' tokens (CLS first, then the patches
    row by row): per layer [patch (, CLS)], layers oldest first."""
    layers_k, batch, _, dim = hidden_KBLD.shape
    hidden_KBLD = hidden_KBLD.astype(jnp.float32)
    tokens_KBND = hidden_KBLD[:, :, 1 : 1 + rows * cols]
    if cls_token:
        cls_KBND = jnp.broadcast_to(hidden_KBLD[:, :, :1], tokens_KBND.shape)
        tokens_KBND = jnp.concatenate([tokens_KBND, cls_KBND], axis=-1)
    features = tokens_KBND.shape[-1]
    grid_BNKF = tokens_KBND.transpose(1, 2, 0, 3)
    return grid_BNKF.reshape(batch, rows, cols, layers_k * features)


class PatchSegmenter(nn.Module):
    """Backbone (a module class taking the config, named by `config.model_type`, returning
    the last k layers with `hidden_layers=k`) + the configured head; float32 logits
    [B, H, W, classes]. The pooled head input is sown as `intermediates/features`."""

    config: Any
    backbone: Any

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        cfg = self.config
        if cfg.segmentation_head not in HEAD_MODULES:
            raise ValueError(
                f"model.segmentation_head={cfg.segmentation_head!r}: expected one of {HEADS}"
            )
        backbone = self.backbone(cfg, name=cfg.model_type)
        _, hidden_KBLD = backbone(pixel_values, deterministic, cfg.segmentation_layers)
        _, height, width, _ = pixel_values.shape
        rows, cols = height // cfg.patch_size, width // cfg.patch_size
        grid = patch_grid(hidden_KBLD, rows, cols, cfg.segmentation_cls_token)
        self.sow("intermediates", "features", grid.mean(axis=(1, 2)))
        head = HEAD_MODULES[cfg.segmentation_head](cfg, name=HEAD)
        return head(grid, pixel_values.astype(jnp.float32))


def feature_width(config: Any) -> int:
    """F, the width of the grid the head reads."""
    per_layer = config.hidden_size * (2 if config.segmentation_cls_token else 1)
    return per_layer * config.segmentation_layers


def hf_rows(config: Any) -> list[HFMapping]:
    """The head's params as torch tensors `segmentation_head.<module>.<weight|bias>`."""

    def linear(name: str, n_in: int, n_out: int) -> list[HFMapping]:
        key, path = f"{HEAD}.{name}", f"{HEAD}/{name}"
        return [
            HFMapping(f"{key}.weight", f"{path}/kernel", (n_out, n_in), (n_in, n_out), True),
            HFMapping(f"{key}.bias", f"{path}/bias", (n_out,), (n_out,)),
        ]

    def conv(name: str, n_in: int, n_out: int) -> list[HFMapping]:
        key, path = f"{HEAD}.{name}", f"{HEAD}/{name}"
        return [
            HFMapping(
                f"{key}.weight", f"{path}/kernel", (n_out, n_in, 3, 3), (3, 3, n_in, n_out), True
            ),
            HFMapping(f"{key}.bias", f"{path}/bias", (n_out,), (n_out,)),
        ]

    def norm(name: str, width: int) -> list[HFMapping]:
        key, path = f"{HEAD}.{name}", f"{HEAD}/{name}"
        return [
            HFMapping(f"{key}.weight", f"{path}/scale", (width,), (width,)),
            HFMapping(f"{key}.bias", f"{path}/bias", (width,), (width,)),
        ]

    classes, width = config.num_labels, feature_width(config)
    if config.segmentation_head == "linear":
        return linear("classifier", width, classes)
    channels = config.decoder_channels
    rows = linear("patch_classifier", width, classes) + linear("project", width, channels)
    for stage in range(STAGES):
        n_in, n_out = channels // 2**stage, channels // 2 ** (stage + 1)
        rows += conv(f"stage_{stage}", n_in, n_out) + norm(f"norm_{stage}", n_out)
    fused = channels // 2**STAGES + IMAGE_CHANNELS
    rows += conv("image_conv", config.num_channels, IMAGE_CHANNELS)
    rows += conv("fuse", fused, IMAGE_CHANNELS)
    return rows + linear("classifier", IMAGE_CHANNELS, classes)
