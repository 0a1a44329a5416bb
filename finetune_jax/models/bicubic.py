"""Bicubic resizing as torch's `interpolate(mode="bicubic", align_corners=False)` computes it,
as constant matrices: how ViT / DINOv2 stretch their position-embedding grid to another input
size (HF's `interpolate_pos_encoding`).

`jax.image.resize(method="cubic")` is not the same maths: it uses Keys' a = -0.5 (torch: -0.75)
and antialiases when shrinking (torch does not), so a 37x37 grid resized to 16x16 would differ
by ~1e-2 from what the pretrained model saw in transformers. The sizes are static, so the
weights are built once in numpy and the resize is two small matmuls under jit.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CUBIC_A = -0.75  # torch's (and OpenCV's) cubic convolution coefficient


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """The four tap weights [..., 4] at fractional offset t (torch's
    `get_cubic_upsample_coefficients`): taps at -1, 0, +1, +2 from floor(x)."""
    a = np.float32(CUBIC_A)

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix M with `M @ x` = x resized along its first axis.

    Source coordinate of output i: (i + 0.5) * in/out - 0.5 (half-pixel centres, no
    clamping, as torch does for cubic); taps outside [0, in_size) repeat the border value.
    Coordinates and weights are computed in float32 as torch's CPU kernel does: in float64
    they would differ by up to ~1e-5 on a 37 -> 24 resize.
    """
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    source = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
    floor = np.floor(source)
    weights = _cubic_weights(source - floor).astype(np.float64)  # [out, 4]
    taps = np.clip(floor[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), np.float64)
    np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.ravel()), weights.ravel())
    return matrix.astype(np.float32)


def resize_grid(grid_HWD, out_height: int, out_width: int):
    """A [H, W, D] grid resized bicubically to [out_height, out_width, D] (torch-exact
    weights, computed in float32 as transformers does whatever the params' dtype)."""
    height, width = grid_HWD.shape[:2]
    rows_OH = jnp.asarray(resize_matrix(height, out_height))
    cols_PW = jnp.asarray(resize_matrix(width, out_width))
    grid_HWD = grid_HWD.astype(jnp.float32)
    # HIGHEST: TPUs would otherwise take bf16 passes through these tiny matmuls.
    return jnp.einsum(
        "oh,hwd,pw->opd", rows_OH, grid_HWD, cols_PW, precision=jax.lax.Precision.HIGHEST
    )
