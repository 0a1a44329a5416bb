"""Where each param of the ViT / DINOv2 models sits in an HF checkpoint, as `HFMapping` rows.

Both types store `embeddings.*`, `encoder.layer.{i}.attention.attention.{query,key,value}`,
`attention.output.dense` and a final `layernorm`; they differ in the names of the block's
norms and MLP (below) and in DINOv2's LayerScale. transformers 5 renames these on load
(`q_proj`, `fc1`...) but still writes, and the hub holds, the names used here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from finetune_jax.models.hf_mapping import HFMapping

if TYPE_CHECKING:
    from finetune_jax.models.vit_config import ViTConfig

# Our block-level names -> the HF ones, per model type.
_BLOCK_NAMES = {
    "vit": {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "mlp/fc1": "intermediate.dense",
        "mlp/fc2": "output.dense",
    },
    "dinov2": {"norm1": "norm1", "norm2": "norm2", "mlp/fc1": "mlp.fc1", "mlp/fc2": "mlp.fc2"},
}


def hf_mappings(config: ViTConfig) -> list[HFMapping]:
    """The HF backbone tensors (keys without `vit.` / `dinov2.`) and where they go in our
    backbone subtree."""
    d, f, h, k = (
        config.hidden_size,
        config.intermediate_size,
        config.num_attention_heads,
        config.head_dim,
    )
    p, c, positions = config.patch_size, config.num_channels, config.grid_size**2 + 1

    def dense(hf: str, ours: str, hf_out: int, hf_in: int, kernel: tuple, bias: tuple) -> list:
        """A torch Linear [out, in] -> our kernel (transposed, heads split) and bias."""
        return [
            HFMapping(f"{hf}.weight", f"{ours}/kernel", (hf_out, hf_in), kernel, True),
            HFMapping(f"{hf}.bias", f"{ours}/bias", (hf_out,), bias),
        ]

    def vector(hf: str, ours: str) -> HFMapping:
        return HFMapping(hf, ours, (d,), (d,))

    def layer_norm(hf: str, ours: str) -> list[HFMapping]:
        return [vector(f"{hf}.weight", f"{ours}/scale"), vector(f"{hf}.bias", f"{ours}/bias")]

    rows = [
        HFMapping("embeddings.cls_token", "embeddings/cls_token", (1, 1, d), (d,)),
        HFMapping(
            "embeddings.position_embeddings",
            "embeddings/position_embeddings",
            (1, positions, d),
            (positions, d),
        ),
        # Conv2d weight [D, C, ph, pw] transposed is [pw, ph, C, D]: our kernel's row order.
        HFMapping(
            "embeddings.patch_embeddings.projection.weight",
            "embeddings/patch_embeddings/kernel",
            (d, c, p, p),
            (p * p * c, d),
            True,
        ),
        vector("embeddings.patch_embeddings.projection.bias", "embeddings/patch_embeddings/bias"),
    ]
    names = _BLOCK_NAMES[config.model_type]
    for i in range(config.num_hidden_layers):
        hf, ours = f"encoder.layer.{i}", f"encoder/layer_{i}"
        for name in ("query", "key", "value"):
            key, path = f"{hf}.attention.attention.{name}", f"{ours}/attention/{name}"
            rows.append(HFMapping(f"{key}.weight", f"{path}/kernel", (d, d), (d, h, k), True))
            if config.qkv_bias:
                rows.append(HFMapping(f"{key}.bias", f"{path}/bias", (d,), (h, k)))
        rows += [
            *dense(
                f"{hf}.attention.output.dense", f"{ours}/attention/output", d, d, (h, k, d), (d,)
            ),
            *layer_norm(f"{hf}.{names['norm1']}", f"{ours}/norm1"),
            *layer_norm(f"{hf}.{names['norm2']}", f"{ours}/norm2"),
            *dense(f"{hf}.{names['mlp/fc1']}", f"{ours}/mlp/fc1", f, d, (d, f), (f,)),
            *dense(f"{hf}.{names['mlp/fc2']}", f"{ours}/mlp/fc2", d, f, (f, d), (d,)),
        ]
        if config.layerscale_value is not None:
            rows += [
                vector(f"{hf}.layer_scale{j}.lambda1", f"{ours}/layer_scale{j}/lambda1")
                for j in (1, 2)
            ]
    return rows + layer_norm("layernorm", "layernorm")


def constant_tensors(config: ViTConfig) -> dict[str, np.ndarray]:
    """Tensors an export adds that no param of ours holds: DINOv2's mask token (used only by
    masked-image pretraining, so our model has none) as zeros, HF's init, so transformers
    loads the exported classifier with no weight left newly initialised."""
    if config.model_type != "dinov2":
        return {}
    return {"dinov2.embeddings.mask_token": np.zeros((1, config.hidden_size), np.float32)}


def layer_stacks(config: ViTConfig) -> dict[str, int]:
    """Stacked layer params (`scan_layers`): stack path -> layer count."""
    stack = f"{config.model_type}/encoder/layer"
    return {stack: config.num_hidden_layers} if config.scan_layers else {}


def backbone_mappings(config: ViTConfig) -> list[HFMapping]:
    """Every backbone param: full paths and full HF keys (`vit.` or `dinov2.`, as the HF task
    model names them; one row per layer)."""
    prefix = config.model_type
    return [
        m._replace(hf_key=f"{prefix}.{m.hf_key}", path=f"{prefix}/{m.path}")
        for m in hf_mappings(config)
    ]


def classifier_mappings(config: ViTConfig) -> list[HFMapping]:
    """The image-classification head: a torch Linear [labels, features]."""
    labels = config.num_labels
    features = 2 * config.hidden_size if config.pools_patch_mean else config.hidden_size
    return [
        HFMapping(
            "classifier.weight", "classifier/kernel", (labels, features), (features, labels), True
        ),
        HFMapping("classifier.bias", "classifier/bias", (labels,), (labels,)),
    ]
