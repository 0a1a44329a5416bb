"""Vision transformers (HF `model_type` vit and dinov2): the Flax modules, init and families.

Input: `pixel_values` [B, H, W, C] (NHWC, channels last, as JAX convolutions and image
libraries lay images out), float, already resized and normalised by the model's
`preprocessor_config.json`. H and W need not be the pretraining `image_size`: the position
grid is resized bicubically to (H // patch, W // patch) exactly as transformers'
`interpolate_pos_encoding` does (`bicubic.py`); like HF's Conv2d, rows and columns beyond the
last whole patch are ignored.

Param names follow HF's DINOv2 (`norm1`, `mlp/fc1`, `layer_scale1`...) for both types; the
backbone subtree is named as the HF task model's prefix (`vit/...`, `dinov2/...`) and its
layers `encoder/layer_{i}` (the default `optim.layer` regex finds them). `vit_hf.py` holds
the HF layout. Logical axis names: `patch`, `embed`, `position`, `heads`, `kv`, `mlp`,
`classes`; activations: `batch`, `length`, `activation_embed`.

Parity with transformers' ViTModel / ViTForImageClassification / Dinov2Model /
Dinov2ForImageClassification is checked in tests/test_vit.py.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax.models import (
    bicubic,
    detection_heads,
    layers,
    segmentation_heads,
    vit_hf,
)
from finetune_jax.models.family import HeadSpec, ModelFamily
from finetune_jax.models.vit_config import ACTIVATION_AXES, ViTConfig

HEAD_BIAS = "classifier/bias"


def _dense(
    config: ViTConfig,
    features: tuple[int, ...],
    names: tuple[str, ...],
    name: str,
    in_axes: int = 1,
    bias: bool = True,
) -> layers.DenseND:
    """A LoRA-capable projection; `names` are the kernel's logical axes (the bias takes the
    output ones)."""
    return layers.DenseND(
        features=features,
        in_axes=in_axes,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        kernel_init=layers.normal_init(config.initializer_range, names),
        bias_init=layers.zeros_init(names[in_axes:]) if bias else None,
        lora=config.lora,
        name=name,
    )


class ViTEmbeddings(nn.Module):
    """Patches projected to tokens, CLS prepended, positions (resized to the grid) added."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixels_BHWC, deterministic: bool = True):
        cfg = self.config
        batch, height, width, channels = pixels_BHWC.shape
        if channels != cfg.num_channels:
            raise ValueError(
                f"pixel_values has {channels} channels in its last axis (NHWC expected: "
                f"[B, H, W, C]), the model {cfg.num_channels}"
            )
        p = cfg.patch_size
        rows, cols = height // p, width // p
        if not rows or not cols:
            raise ValueError(f"image {height}x{width} is smaller than one {p}x{p} patch")
        # Patch values ordered (column, row, channel): HF's Conv2d weight [D, C, ph, pw]
        # transposed, which is how the mapping stores the kernel [pw * ph * C, D].
        x = pixels_BHWC[:, : rows * p, : cols * p].reshape(batch, rows, p, cols, p, channels)
        x = x.transpose(0, 1, 3, 4, 2, 5).reshape(batch, rows * cols, cfg.patch_features)
        x_BND = _dense(cfg, (cfg.hidden_size,), ("patch", "embed"), "patch_embeddings")(
            x, deterministic
        )
        cls_D = self.param(
            "cls_token",
            layers.normal_init(cfg.initializer_range, ("embed",)),
            (cfg.hidden_size,),
            cfg.param_dtype,
        )
        positions_PD = self.param(
            "position_embeddings",
            layers.normal_init(cfg.initializer_range, ("position", "embed")),
            (cfg.grid_size**2 + 1, cfg.hidden_size),
            cfg.param_dtype,
        )
        cls_B1D = jnp.broadcast_to(cls_D.astype(cfg.dtype), (batch, 1, cfg.hidden_size))
        x_BLD = jnp.concatenate([cls_B1D, x_BND.astype(cfg.dtype)], axis=1)
        x_BLD = x_BLD + _positions(positions_PD, cfg.grid_size, rows, cols).astype(cfg.dtype)
        return layers.Dropout(cfg.hidden_dropout_prob)(x_BLD, deterministic=deterministic)


def _positions(positions_PD, grid: int, rows: int, cols: int):
    """[1 + rows * cols, D]: the CLS position, then the grid resized to rows x cols."""
    if (rows, cols) == (grid, grid):
        return positions_PD
    patches_GGD = positions_PD[1:].reshape(grid, grid, -1)
    resized = bicubic.resize_grid(patches_GGD, rows, cols).reshape(rows * cols, -1)
    return jnp.concatenate([positions_PD[:1].astype(resized.dtype), resized], axis=0)


class ViTAttention(nn.Module):
    """Multi-head self-attention over all tokens (no mask) + output projection."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BLD, deterministic: bool = True):
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.head_dim

        def project(name: str) -> jax.Array:
            dense = _dense(
                cfg, (heads, head_dim), ("embed", "heads", "kv"), name, bias=cfg.qkv_bias
            )
            return dense(x_BLD, deterministic)

        # Scale q (L*D values) rather than the scores (L*L*H values); same maths.
        q_BLHK = project("query") * jnp.asarray(head_dim**-0.5, cfg.dtype)
        k_BLHK, v_BLHK = project("key"), project("value")
        scores_BHLL = jnp.einsum("bqhd,bkhd->bhqk", q_BLHK, k_BLHK)
        # Softmax in float32 whatever the compute dtype: bf16 exp/sum loses too much.
        probs_BHLL = jax.nn.softmax(scores_BHLL.astype(jnp.float32), axis=-1)
        probs_BHLL = layers.Dropout(cfg.attention_probs_dropout_prob)(
            probs_BHLL, deterministic=deterministic
        ).astype(cfg.dtype)
        context_BLHK = jnp.einsum("bhqk,bkhd->bqhd", probs_BHLL, v_BLHK)
        return _dense(cfg, (cfg.hidden_size,), ("heads", "kv", "embed"), "output", in_axes=2)(
            context_BLHK, deterministic
        )


class ViTMLP(nn.Module):
    """fc1 -> activation -> fc2."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BLD, deterministic: bool = True):
        cfg = self.config
        h_BLF = _dense(cfg, (cfg.intermediate_size,), ("embed", "mlp"), "fc1")(x_BLD, deterministic)
        h_BLF = layers.get_activation(cfg.hidden_act)(h_BLF)
        return _dense(cfg, (cfg.hidden_size,), ("mlp", "embed"), "fc2")(h_BLF, deterministic)


class LayerScale(nn.Module):
    """A learned per-channel scale `lambda1` [D] on a residual branch (DINOv2's LayerScale)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BLD):
        cfg = self.config
        init = nn.with_logical_partitioning(
            nn.initializers.constant(cfg.layerscale_value), ("embed",)
        )
        lambda_D = self.param("lambda1", init, (cfg.hidden_size,), cfg.param_dtype)
        return x_BLD * lambda_D.astype(cfg.dtype)


class ViTLayer(nn.Module):
    """Pre-norm block: x + branch(norm(x)) for attention, then for the MLP.

    Each branch's output is dropped out (hidden_dropout_prob), scaled by LayerScale (dinov2)
    and dropped per sample (stochastic depth, dinov2's drop_path_rate) before the residual.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BLD, deterministic: bool = True):
        cfg = self.config
        branches = ((ViTAttention, "attention", 1), (ViTMLP, "mlp", 2))
        for block, name, index in branches:
            h_BLD = layers.layer_norm(cfg, f"norm{index}")(x_BLD)
            h_BLD = block(cfg, name=name)(h_BLD, deterministic)
            h_BLD = layers.Dropout(cfg.hidden_dropout_prob)(h_BLD, deterministic=deterministic)
            if cfg.layerscale_value is not None:
                h_BLD = LayerScale(cfg, name=f"layer_scale{index}")(h_BLD)
            # Stochastic depth: one keep / drop draw per sample, shared by its tokens.
            h_BLD = layers.Dropout(cfg.drop_path_rate, broadcast_dims=(1, 2))(
                h_BLD, deterministic=deterministic
            )
            x_BLD = x_BLD + h_BLD
        return nn.with_logical_constraint(x_BLD, ACTIVATION_AXES)


class ViTEncoder(nn.Module):
    """The stack of `layer_{i}` blocks.

    With `scan_layers`, one `nn.scan` over a single `layer` block whose params are stacked
    along a leading `layers` axis: one layer in the program whatever the depth.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, x_BLD, deterministic: bool = True, collect: int = 0):
        return layers.encoder_stack(
            self.scope.path, ViTLayer, self.config, x_BLD, deterministic, collect=collect
        )


class ViTModel(nn.Module):
    """Embeddings + encoder + final LayerNorm; returns the last hidden state [B, 1 + N, D]
    (CLS first, then the patches row by row), as HF's `last_hidden_state`.

    With `hidden_layers=k` > 0 it returns `(last hidden state, hidden_KBLD)`: the last k
    blocks' outputs, oldest first, each through the final LayerNorm (DINOv2's
    `get_intermediate_layers(norm=True)`, what its dense heads read)."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True, hidden_layers: int = 0):
        cfg = self.config
        x_BLD = ViTEmbeddings(cfg, name="embeddings")(pixel_values, deterministic)
        x_BLD = nn.with_logical_constraint(x_BLD, ACTIVATION_AXES)
        norm = layers.layer_norm(cfg, "layernorm")
        if not hidden_layers:
            return norm(ViTEncoder(cfg, name="encoder")(x_BLD, deterministic))
        if not 0 < hidden_layers <= cfg.num_hidden_layers:
            raise ValueError(
                f"{hidden_layers} hidden layers asked of a {cfg.num_hidden_layers}-layer ViT"
            )
        x_BLD, hidden_KBLD = ViTEncoder(cfg, name="encoder")(x_BLD, deterministic, hidden_layers)
        return norm(x_BLD), norm(hidden_KBLD)


class ViTForImageClassification(nn.Module):
    """The backbone (`vit/` or `dinov2/`) + a `classifier` Dense; float32 logits [B, labels].

    The classifier reads the CLS token (ViT) or [CLS, mean of the patch tokens] (DINOv2),
    as HF's ViTForImageClassification / Dinov2ForImageClassification do.
    """

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        cfg = self.config
        x_BLD = ViTModel(cfg, name=cfg.model_type)(pixel_values, deterministic)
        x_BLD = x_BLD.astype(jnp.float32)  # the head is tiny: float32, never bf16 logits
        features_BF = x_BLD[:, 0]
        if cfg.pools_patch_mean:
            features_BF = jnp.concatenate([features_BF, x_BLD[:, 1:].mean(axis=1)], axis=-1)
        # The features the head sees, for drift monitoring: apply(..., mutable="intermediates").
        self.sow("intermediates", "features", features_BF)
        return layers.classifier(cfg.num_labels, cfg.param_dtype, cfg.initializer_range)(
            features_BF
        )


class ViTForDetection(nn.Module):
    """The backbone + `detection_head` (models/detection_heads.py) on the last layer's patch
    tokens as a grid: {"heatmap", "boxes", "centers"} (see there) for the detection loss."""

    config: ViTConfig

    @nn.compact
    def __call__(self, pixel_values, deterministic: bool = True):
        cfg = self.config
        x_BLD = ViTModel(cfg, name=cfg.model_type)(pixel_values, deterministic)
        batch, height, width, _ = pixel_values.shape
        rows, cols = height // cfg.patch_size, width // cfg.patch_size
        x_BhwD = x_BLD[:, 1:].reshape(batch, rows, cols, cfg.hidden_size)
        head = detection_heads.DetectionHead(
            cfg.num_labels,
            cfg.detection_width,
            cfg.detection_upsample,
            cfg.patch_size,
            cfg.initializer_range,
            name=detection_heads.HEAD,
        )
        return head(x_BhwD)


def _detection_rows(config: ViTConfig) -> list:
    return detection_heads.head_rows(
        config.hidden_size, config.detection_width, config.num_labels, config.detection_upsample
    )


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("head",))
def init_params(config: ViTConfig, rng: jax.Array, head: type | None = None) -> dict[str, Any]:
    """Initialises ViTForImageClassification; returns the boxed (nn.Partitioned) params.

    Traced at the pretraining `image_size`; the params do not depend on the input size.
    For shapes and logical names without allocating:
    `jax.eval_shape(functools.partial(init_params, config), rng)`.
    """
    size = config.grid_size * config.patch_size
    pixels = jnp.zeros((1, size, size, config.num_channels), config.dtype)
    return (head or ViTForImageClassification)(config).init({"params": rng}, pixels)["params"]


def _own_file_head(module, hf_rows, head: str) -> HeadSpec:
    """A dense-vision head transformers has no class for: export writes the backbone as
    <prefix>Model and the head's params (all under `head/`) to `<head>.safetensors` beside it."""
    return HeadSpec(
        module=module,
        hf_rows=hf_rows,
        new_params=(head,),
        hf_class_suffix="Model",
        peft_task_type=None,
        modules_to_save=(head,),
        trained=head + "/.*",
        hf_file=head + ".safetensors",
    )


def _family(model_type: str, class_prefix: str) -> ModelFamily:
    """One family per HF model type: the types differ in the prefix a task model puts on
    the backbone's tensors (`vit.` / `dinov2.`), which a bare checkpoint leaves out."""
    return ModelFamily(
        name=model_type,
        model_types=(model_type,),
        config_from_hf=ViTConfig.from_hf,
        heads={
            "image_classification": HeadSpec(
                module=ViTForImageClassification,
                hf_rows=vit_hf.classifier_mappings,
                new_params=("classifier",),
                bias=HEAD_BIAS,
                hf_class_suffix="ForImageClassification",
                # HF PEFT has no image-classification task type; its image examples use none.
                peft_task_type=None,
                modules_to_save=("classifier",),
                trained=r"classifier/.*",
            ),
            # A CenterNet-style detector on a simple feature pyramid.
            "detection": _own_file_head(ViTForDetection, _detection_rows, detection_heads.HEAD),
            # A linear or light-decoder head on the patch tokens.
            "segmentation": _own_file_head(
                functools.partial(segmentation_heads.PatchSegmenter, backbone=ViTModel),
                segmentation_heads.hf_rows,
                segmentation_heads.HEAD,
            ),
        },
        init=lambda head, config, rng: init_params(config, rng, head=head),
        backbone_mappings=vit_hf.backbone_mappings,
        layer_stacks=vit_hf.layer_stacks,
        lora_targets=r".*/attention/(query|value)/kernel",
        # Every attention and MLP projection of the layers (not the patch embedding or heads).
        quantize_targets=r".*/layer_\d+/(attention/(query|key|value|output)|mlp/(fc1|fc2))/kernel",
        dropout_keys=("hidden_dropout_prob", "attention_probs_dropout_prob"),
        constant_tensors=vit_hf.constant_tensors,
        ignored_tensors=("embeddings.mask_token",),  # written by export, never read
        bare_prefix=model_type + ".",
        # Bare checkpoints carry a pooler (ViTModel) or a mask token (Dinov2Model) that no
        # classifier uses.
        strict=False,
        hf_class_names={model_type: class_prefix},
    )


VIT_FAMILY = _family("vit", "ViT")
DINOV2_FAMILY = _family("dinov2", "Dinov2")
