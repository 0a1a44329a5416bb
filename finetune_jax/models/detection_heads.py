"""An anchor-free detector head on a grid of patch features (CenterNet / TTFNet style).

The last layer's patch tokens [B, h, w, D] (stride = the patch size) go through a ViTDet-style
"simple feature pyramid" reduced to its one finest level: `upsample` x transposed 2x2
convolutions (each with LayerNorm + GELU; stride patch / upsample, 7 px for DINOv2's 14 at
2x), then one 3x3 convolution. Two small branches read that map:

  heatmap  [B, H, W, classes] logits: one peak per object at its centre cell (focal loss on
           Gaussian targets, `tasks/detection_losses.py`); the bias starts at the logit of
           0.1, as in CenterNet and RetinaNet, so the first steps are not swamped by the
           many easy background cells.
  boxes    [B, H, W, 4] (x0, y0, x1, y1) in input pixels: each cell predicts the distances
           from its centre to the four sides (softplus, in units of 4 strides), so every
           cell near an object can regress its box (TTFNet's GIoU over the Gaussian area,
           which converges in far fewer steps than CenterNet's centre-only size head).

Everything here is float32 (the head is tiny). The module knows nothing of the backbone:
`vit.ViTForDetection` feeds it. `head_rows` lists its params for export, which writes them to
their own safetensors file (transformers has no DINOv2 detector class).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from finetune_jax.models.hf_mapping import HFMapping

HEAD = "detection_head"  # the head's param subtree (and its export file's key prefix)
PRIOR = 0.1  # the heatmap's starting probability


def _init(stddev: float, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def _zeros(names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


class DetectionHead(nn.Module):
    """Patch features [B, h, w, D] -> {"heatmap": [B, H, W, C] logits, "boxes": [B, H, W, 4]
    xyxy pixels, "centers": [H, W, 2] (x, y) pixels of the cells}, H = h * upsample."""

    num_classes: int
    width: int
    upsample: int  # 1, 2 or 4: output stride = patch_size / upsample
    patch_size: int
    initializer_range: float = 0.02

    def _conv(self, features: int, size: int, name: str, names, bias_init=None, stride=1):
        layer = nn.ConvTranspose if stride > 1 else nn.Conv
        return layer(
            features,
            (size, size),
            strides=(stride, stride),
            padding="SAME",
            dtype=jnp.float32,
            kernel_init=_init(self.initializer_range, (None, None, *names)),
            bias_init=bias_init or _zeros((names[-1],)),
            name=name,
        )

    def _norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(
            epsilon=1e-6,
            dtype=jnp.float32,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (None,)),
            bias_init=_zeros((None,)),
            name=name,
        )

    @nn.compact
    def __call__(self, x_BhwD: jax.Array) -> dict[str, jax.Array]:
        check_upsample(self.upsample)
        x = x_BhwD.astype(jnp.float32)
        names = ("embed", None)  # the first layer reads the backbone's embedding axis
        for i in range(int(math.log2(self.upsample))):
            x = self._conv(self.width, 2, f"up_{i}", names, stride=2)(x)
            x = nn.gelu(self._norm(f"up_norm_{i}")(x))
            names = (None, None)
        x = self._conv(self.width, 3, "neck", names)(x)
        x = nn.gelu(self._norm("neck_norm")(x))
        heat = nn.relu(self._conv(self.width, 3, "heatmap_hidden", (None, None))(x))
        prior = nn.with_logical_partitioning(
            nn.initializers.constant(-math.log((1 - PRIOR) / PRIOR)), ("classes",)
        )
        heat = self._conv(self.num_classes, 1, "heatmap", (None, "classes"), prior)(heat)
        box = nn.relu(self._conv(self.width, 3, "box_hidden", (None, None))(x))
        box = self._conv(4, 1, "box", (None, None))(box)
        stride = self.patch_size / self.upsample
        centers_HW2 = cell_centers(x.shape[1], x.shape[2], stride)
        sides = jax.nn.softplus(box) * (4 * stride)  # distances to left, top, right, bottom
        corners = jnp.concatenate([centers_HW2, centers_HW2], axis=-1)
        boxes = corners + sides * jnp.array([-1.0, -1.0, 1.0, 1.0])
        return {"heatmap": heat, "boxes": boxes, "centers": centers_HW2}


def check_upsample(upsample: int) -> None:
    """Refuses an upsampling factor the transposed-convolution stack cannot make."""
    if upsample not in (1, 2, 4):
        raise ValueError(f"detection_upsample={upsample}: expected 1, 2 or 4")


def cell_centers(rows: int, cols: int, stride: float) -> jax.Array:
    """[rows, cols, 2]: (x, y) in input pixels of each output cell's centre."""
    ys = (jnp.arange(rows, dtype=jnp.float32) + 0.5) * stride
    xs = (jnp.arange(cols, dtype=jnp.float32) + 0.5) * stride
    return jnp.stack(jnp.meshgrid(xs, ys), axis=-1)


def head_rows(hidden: int, width: int, classes: int, upsample: int) -> list[HFMapping]:
    """The head's params as export rows: key `detection_head.<path with dots>`, our layout
    (kernels [kh, kw, in, out], as Flax stores them) on both sides."""
    shapes: dict[str, tuple[int, ...]] = {}
    channels = hidden
    for i in range(int(math.log2(upsample))):
        shapes |= {f"up_{i}/kernel": (2, 2, channels, width), f"up_{i}/bias": (width,)}
        shapes |= {f"up_norm_{i}/scale": (width,), f"up_norm_{i}/bias": (width,)}
        channels = width
    convs = {
        "neck": (3, channels, width),
        "heatmap_hidden": (3, width, width),
        "heatmap": (1, width, classes),
        "box_hidden": (3, width, width),
        "box": (1, width, 4),
    }
    for name, (size, cin, cout) in convs.items():
        shapes |= {f"{name}/kernel": (size, size, cin, cout), f"{name}/bias": (cout,)}
    shapes |= {"neck_norm/scale": (width,), "neck_norm/bias": (width,)}
    return [
        HFMapping(f"{HEAD}.{path.replace('/', '.')}", f"{HEAD}/{path}", shape, shape)
        for path, shape in shapes.items()
    ]
