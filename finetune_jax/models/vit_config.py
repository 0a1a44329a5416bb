"""`ViTConfig`: the hyper-parameters of the ViT family (HF `model_type` vit and dinov2), read
from an HF config.json."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from finetune_jax.models import layers
from finetune_jax.models import lora as lora_lib

MODEL_TYPES = ("vit", "dinov2")
ACTIVATION_AXES = ("batch", "length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture and head hyper-parameters; field names follow HF's ViTConfig / Dinov2Config.

    The two model types share one architecture (pre-norm blocks, CLS + patch tokens, learned
    absolute positions on an `image_size // patch_size` grid, resized bicubically for other
    input sizes); DINOv2 adds LayerScale (`layerscale_value`) and stochastic depth
    (`drop_path_rate`), and its classifier reads [CLS, mean of patch tokens] instead of CLS.
    """

    model_type: str = "vit"  # vit | dinov2
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072  # dinov2: hidden_size * mlp_ratio
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    drop_path_rate: float = 0.0  # dinov2's stochastic depth (per sample, per residual branch)
    layer_norm_eps: float = 1e-12
    image_size: int = 224  # pretraining size: the position grid is image_size // patch_size
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float | None = None  # dinov2: LayerScale's init; None: no LayerScale
    initializer_range: float = 0.02
    num_labels: int = 2
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # storage dtype of the params
    remat: str = "none"  # none | full | dots_saveable (see layers.remat)
    lora: lora_lib.LoraConfig | None = None  # LoRA on the DenseND kernels its targets match
    scan_layers: bool = False  # one nn.scan over params stacked along a `layers` axis
    # Semantic segmentation (models/segmentation_heads.py): the head, the last k blocks'
    # patch tokens it reads (concatenated), whether the CLS token joins each patch's, and the
    # decoder's width.
    segmentation_head: str = "linear"  # linear | decoder
    segmentation_layers: int = 1
    segmentation_cls_token: bool = False
    decoder_channels: int = 128
    # Object detection (models/detection_heads.py): the head's channels, and how many times
    # its transposed 2x2 convolutions upsample the patch grid (stride = patch / upsample).
    detection_width: int = 128
    detection_upsample: int = 2

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of {MODEL_TYPES}")
        layers.get_activation(self.hidden_act)  # fail at config time, not mid-trace
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        """Side of the pretrained position grid (37 for DINOv2's 518 / 14)."""
        return self.image_size // self.patch_size

    @property
    def patch_features(self) -> int:
        """Values per patch: patch_size * patch_size * num_channels."""
        return self.patch_size * self.patch_size * self.num_channels

    @property
    def pools_patch_mean(self) -> bool:
        """Whether the classifier reads [CLS, mean of patch tokens] (HF's
        Dinov2ForImageClassification) rather than CLS alone (ViTForImageClassification)."""
        return self.model_type == "dinov2"

    @classmethod
    def from_hf(cls, hf_config: Mapping[str, Any], **overrides: Any) -> ViTConfig:
        """Builds a config from an HF ViT or Dinov2 config.json dict; unknown keys are ignored.

        HF's "dtype" (the storage dtype) is not our compute dtype and is skipped.
        """
        model_type = hf_config.get("model_type", "vit")
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in hf_config.items() if k in names and k != "dtype"}
        for key in ("image_size", "patch_size"):
            value = hf_config.get(key)
            if isinstance(value, list | tuple):
                if len(set(value)) != 1:  # HF allows (h, w); the position grid here is square
                    raise ValueError(
                        f"{key} {value} is not square; only square grids are supported"
                    )
                kwargs[key] = value[0]
        if model_type == "dinov2":
            if hf_config.get("use_swiglu_ffn"):
                # The SwiGLU MLP (DINOv2-g) has other params; refuse rather than mis-load.
                raise ValueError("dinov2 with use_swiglu_ffn=true is not supported")
            hidden = hf_config.get("hidden_size", cls.hidden_size)
            kwargs["intermediate_size"] = int(hidden * hf_config.get("mlp_ratio", 4))
            kwargs["layerscale_value"] = hf_config.get("layerscale_value", 1.0)
            kwargs.setdefault("layer_norm_eps", 1e-6)
        if "num_labels" not in hf_config and hf_config.get("id2label"):
            kwargs["num_labels"] = len(hf_config["id2label"])  # HF stores labels, not a count
        kwargs.update(overrides)
        return cls(**kwargs)
