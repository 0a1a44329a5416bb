"""Segmentation heads against a torch reading of their export: transformers' Dinov2Model for
the backbone (hidden states of the last layers through its final LayerNorm) and the head's
exported tensors applied with torch's own conv / interpolate / layer_norm / GELU."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from finetune_jax.hf import loading
from finetune_jax.models import hf_mapping, segmentation_heads, vit

PATCH, LAYERS, SIZE = 7, 3, 35


@pytest.fixture(scope="module")
def tiny_dinov2_dir(tmp_path_factory):
    """A tiny random bare Dinov2Model, 3 layers (the heads read the last 2)."""
    out_dir = tmp_path_factory.mktemp("tiny_dinov2_seg")
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=28,
        patch_size=PATCH,
    )
    torch.manual_seed(0)
    transformers.Dinov2Model(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def _torch_grid(model, pixels_nchw, layers: int, cls_token: bool) -> torch.Tensor:
    """[B, F, rows, cols]: per layer [patch (, CLS)], layers oldest first."""
    hidden = model(pixels_nchw, output_hidden_states=True).hidden_states[-layers:]
    parts = []
    for h in hidden:
        h = model.layernorm(h)
        patches = h[:, 1:]
        parts.append(patches)
        if cls_token:
            parts.append(h[:, :1].expand_as(patches))
    tokens = torch.cat(parts, dim=-1)  # [B, N, F]
    side = int(round(tokens.shape[1] ** 0.5))
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def _torch_head(head: str, t: dict, grid, pixels, size: int) -> torch.Tensor:
    """The exported head read as torch modules would: logits [B, C, H, W]."""

    def linear(name, x):  # a 1x1 convolution
        return F.conv2d(x, t[f"{name}.weight"][:, :, None, None], t[f"{name}.bias"])

    def conv(name, x):
        return F.conv2d(x, t[f"{name}.weight"], t[f"{name}.bias"], padding=1)

    def up(x, height, width):
        return F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False)

    p = segmentation_heads.HEAD
    if head == "linear":
        return up(linear(f"{p}.classifier", grid), size, size)
    scores = up(linear(f"{p}.patch_classifier", grid), size, size)
    x = F.gelu(linear(f"{p}.project", grid))
    for stage in range(segmentation_heads.STAGES):
        x = conv(f"{p}.stage_{stage}", up(x, 2 * x.shape[2], 2 * x.shape[3]))
        norm = (t[f"{p}.norm_{stage}.weight"], t[f"{p}.norm_{stage}.bias"])
        x = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], *norm, eps=1e-6)
        x = F.gelu(x.permute(0, 3, 1, 2))
    image = F.gelu(conv(f"{p}.image_conv", pixels))
    x = F.gelu(conv(f"{p}.fuse", torch.cat([up(x, size, size), image], dim=1)))
    return scores + linear(f"{p}.classifier", x)


@pytest.mark.parametrize("head", segmentation_heads.HEADS)
def test_head_equals_a_torch_reading_of_its_export(tiny_dinov2_dir, head):
    family = vit.DINOV2_FAMILY.with_head("segmentation")
    config, module, params = loading.load_pretrained(
        family,
        str(tiny_dinov2_dir),
        "segmentation",
        seed=3,
        num_labels=5,
        segmentation_head=head,
        segmentation_layers=2,
        segmentation_cls_token=True,
        decoder_channels=16,  # stages of 8 and 4: a LayerNorm over 2 amplifies rounding
    )
    pixels = np.random.default_rng(0).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32)
    ours = np.asarray(jax.jit(module.apply)({"params": params}, pixels))
    assert ours.shape == (2, SIZE, SIZE, 5) and ours.dtype == np.float32

    tensors = hf_mapping.params_to_hf(params, family, config)
    head_keys = {m.hf_key for m in family.head.hf_rows(config)}
    assert head_keys and head_keys <= set(tensors)
    t = {k: torch.from_numpy(np.array(tensors[k])) for k in head_keys}
    model = transformers.Dinov2Model.from_pretrained(tiny_dinov2_dir).eval()
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    with torch.no_grad():
        grid = _torch_grid(model, x, 2, cls_token=True)
        assert grid.shape[1] == segmentation_heads.feature_width(config)
        theirs = _torch_head(head, t, grid, x, SIZE).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-4, rtol=1e-4)


def test_the_scanned_backbone_reads_the_same_layers(tiny_dinov2_dir):
    family = vit.DINOV2_FAMILY.with_head("segmentation")
    outputs = []
    for scan in (False, True):
        _, module, params = loading.load_pretrained(
            family,
            str(tiny_dinov2_dir),
            "segmentation",
            num_labels=3,
            segmentation_layers=2,
            scan_layers=scan,
        )
        pixels = np.random.default_rng(1).normal(size=(1, 28, 28, 3)).astype(np.float32)
        outputs.append(np.asarray(jax.jit(module.apply)({"params": params}, pixels)))
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5)
