"""Quantized storage of frozen kernels (QLoRA's base): the NF4, int8 and Q4_1 formats, as
arrays.

NF4 (Dettmers et al. 2023, "QLoRA"; bitsandbytes' `quantize_4bit(quant_type="nf4",
blocksize=64, compress_statistics=True)`): a kernel [*in, *out] is cut into blocks of 64
consecutive weights along its flattened input dims (for each output feature: the blocks
bitsandbytes takes along a torch Linear weight's rows), each block scaled by its absmax into
[-1, 1] and every weight stored as the index of the nearest of the 16 NF4 values, two 4-bit
codes per uint8. Double quantization: the f32 block absmaxes, minus their mean, are quantized
again to 8 bits (bitsandbytes' signed dynamic map) in groups of 256 blocks with a f32 absmax
per group: 4 + 8/64 + 32/(64*256) = 4.127 bits per weight. int8: per output feature, the
absmax over the input dims / 127, symmetric codes in [-127, 127]: 8 bits + one f32 per
output feature. Q4_1 (llama.cpp's): blocks of 32 weights, each with an f16 scale and an f16
minimum, codes round((w - min) / scale) in 0..15: 5 bits per weight; a GGUF base stored in
Q4_1 loads its own blocks unchanged (`hf/loading.py`).

The leaves keep the kernel's dims where they can (so they shard like it, see `leaf_axes`):

  nf4:  kernel_nf4 uint8 [*in[:-1], in[-1]/2, *out] (the pairs packed along the last input
        dim, high nibble first), kernel_nf4_absmax uint8 [blocks, *out], kernel_nf4_absmax_scale
        f32 [groups], kernel_nf4_absmax_offset f32 []
  int8: kernel_int8 int8 [*in, *out], kernel_int8_scale f32 [1, .., 1, *out]
  q4_1: kernel_q4_1 as NF4's codes, kernel_q4_1_scale and kernel_q4_1_min f16
        [*in[:-1], in[-1]/32, *out] (runs of 32 along the last input dim)

`quantize` runs on numpy (the loader, on the host, one tensor at a time) or jax.numpy (a
model's init) alike and is deterministic; `dequantize` is jax.numpy. Both are plain array
maths: `quantized_kernels.py` puts the leaves into Flax layers and param trees.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("none", "nf4", "int8", "q4_1")  # `peft.quantize` values
NF4_BLOCK = 64  # weights per absmax (QLoRA's block size)
Q4_1_BLOCK = 32  # weights per scale and minimum (llama.cpp's Q4_1)
ABSMAX_GROUP = 256  # block absmaxes per f32 scale of the double quantization
INT8_MAX = 127
BLOCKS_SUFFIX = "_blocks"  # logical name of a dim cut into blocks: `embed` -> `embed_blocks`
# The leaves that replace a layer's `kernel`, the codes first.
LEAVES = {
    "nf4": (
        "kernel_nf4",
        "kernel_nf4_absmax",
        "kernel_nf4_absmax_scale",
        "kernel_nf4_absmax_offset",
    ),
    "int8": ("kernel_int8", "kernel_int8_scale"),
    "q4_1": ("kernel_q4_1", "kernel_q4_1_scale", "kernel_q4_1_min"),
}
LEAF_NAMES = tuple(name for names in LEAVES.values() for name in names)

# The 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1], with an exact 0 (the paper's
# table, as bitsandbytes' `get_4bit_type("nf4")` holds it).
NF4_VALUES = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map()`, Dettmers 2016): 256
    sorted values in [-1, 1], a dynamic exponent with fewer fraction bits for larger values."""
    data: list[float] = []
    exponent_bits, non_sign_bits = 7, 7
    for i in range(exponent_bits):
        boundaries = np.linspace(0.1, 1, 2 ** (i + non_sign_bits - exponent_bits) + 1)
        means = ((boundaries[:-1] + boundaries[1:]) / 2).astype(np.float32).astype(np.float64)
        data += (10 ** (-(exponent_bits - 1) + i) * means).tolist()
        data += (-(10 ** (-(exponent_bits - 1) + i)) * means).tolist()
    return np.array(sorted([*data, 0.0, 1.0]), np.float32)


DYNAMIC_VALUES = dynamic_map()


def _midpoints(values: np.ndarray) -> np.ndarray:
    return ((values[:-1] + values[1:]) / 2).astype(np.float32)


def _nearest(scaled: Any, values: np.ndarray, xp: Any) -> Any:
    """uint8 index of the nearest of the sorted `values` (a midpoint goes to the lower one,
    as bitsandbytes' `bucketize`)."""
    return xp.searchsorted(xp.asarray(_midpoints(values)), scaled, side="left").astype(xp.uint8)


def _scaled(x: Any, absmax: Any, xp: Any) -> Any:
    """x / absmax in [-1, 1], as bitsandbytes computes it (times the f32 reciprocal)."""
    return xp.clip(x * (np.float32(1.0) / xp.maximum(absmax, np.float32(1e-38))), -1.0, 1.0)


# Weights quantized at a time on the host: numpy's float temporaries (scaled copies, int64
# search indices: ~17 bytes per weight for NF4) then cover this many weights, not the whole
# kernel (a 70B MLP projection holds 235M weights: 4 GB of them).
HOST_CHUNK_WEIGHTS = 1 << 22


def quantize(method: str, kernel: Any, in_axes: int, xp: Any = np) -> dict[str, Any]:
    """{leaf name: array} of a float kernel [*in, *out] (`in_axes` input dims) in `method`'s
    format; `xp` is numpy or jax.numpy. On numpy, the output features are quantized a chunk
    at a time (every format's blocks lie within one output feature), so the temporaries
    stay near `HOST_CHUNK_WEIGHTS` weights' worth whatever the kernel's size."""
    if method not in LEAVES:
        raise ValueError(f"quantization {method!r} is not one of {METHODS[1:]}")
    kernel = xp.asarray(kernel, xp.float32)
    in_shape, out_shape = kernel.shape[:in_axes], kernel.shape[in_axes:]
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    columns = kernel.reshape(*in_shape, n_out)
    step = max(1, HOST_CHUNK_WEIGHTS // max(1, n_in)) if xp is np else n_out
    if step >= n_out:
        leaves = _QUANTIZERS[method](columns, in_axes, xp)
    else:
        parts = [
            _QUANTIZERS[method](columns[..., start : start + step], in_axes, xp)
            for start in range(0, n_out, step)
        ]
        leaves = {name: xp.concatenate([p[name] for p in parts], -1) for name in parts[0]}
    if method == "nf4":  # the double quantization runs over all the block absmaxes at once
        codes, scale, offset = _quantize_absmax(leaves.pop("absmax"), xp)
        leaves.update(zip(LEAVES["nf4"][1:], (codes, scale, offset)))
    per_group = LEAVES["nf4"][2:]  # the double quantization's scale and offset: no feature axis
    return {
        name: leaf if name in per_group else leaf.reshape(*leaf.shape[:-1], *out_shape)
        for name, leaf in leaves.items()
    }


def _quantize_int8(columns: Any, in_axes: int, xp: Any) -> dict[str, Any]:
    """Codes and per-output-feature scales of a kernel [*in, n] (see `quantize`)."""
    absmax = xp.max(xp.abs(columns), axis=tuple(range(in_axes)), keepdims=True)
    scale = (absmax / np.float32(INT8_MAX)).astype(xp.float32)
    codes = xp.round(columns / xp.where(scale == 0, np.float32(1.0), scale))
    return dict(zip(LEAVES["int8"], (xp.clip(codes, -INT8_MAX, INT8_MAX).astype(xp.int8), scale)))


def _quantize_nf4(columns: Any, in_axes: int, xp: Any) -> dict[str, Any]:
    """Packed codes and the f32 block absmaxes [blocks, n] (`absmax`, double-quantized by
    `quantize` once every chunk's are in) of a kernel [*in, n]."""
    n_in, n_out = math.prod(columns.shape[:in_axes]), columns.shape[-1]
    blocks = -(-n_in // NF4_BLOCK)  # runs of 64 along the flattened input dims, zero-padded
    flat = columns.reshape(n_in, n_out)
    if blocks * NF4_BLOCK != n_in:
        flat = xp.pad(flat, ((0, blocks * NF4_BLOCK - n_in), (0, 0)))
    flat = flat.reshape(blocks, NF4_BLOCK, n_out)
    absmax = xp.max(xp.abs(flat), axis=1)  # [blocks, out]
    codes = _nearest(_scaled(flat, absmax[:, None, :], xp), NF4_VALUES, xp)
    return {LEAVES["nf4"][0]: pack(codes, columns.shape, in_axes), "absmax": absmax}


def _quantize_q4_1(kernel: Any, in_axes: int, xp: Any) -> dict[str, Any]:
    """llama.cpp's `quantize_row_q4_1` (as `gguf.quants.Q4_1`) over runs of 32 along the last
    input dim (a short last run padded with its last weight, which moves neither its minimum
    nor its maximum): scale (max - min) / 15, codes trunc((w - min) / scale + 0.5)."""
    axis, size = in_axes - 1, kernel.shape[in_axes - 1]
    blocks = -(-size // Q4_1_BLOCK)
    pad = [(0, 0)] * kernel.ndim
    pad[axis] = (0, blocks * Q4_1_BLOCK - size)
    runs = xp.pad(kernel, pad, mode="edge").reshape(
        *kernel.shape[:axis], blocks, Q4_1_BLOCK, *kernel.shape[in_axes:]
    )
    low, high = xp.min(runs, axis=in_axes), xp.max(runs, axis=in_axes)  # [..., blocks, *out]
    scale = (high - low) / np.float32(15)
    inverse = xp.where(scale == 0, np.float32(0), np.float32(1) / scale)
    codes = xp.trunc(
        (runs - xp.expand_dims(low, in_axes)) * xp.expand_dims(inverse, in_axes) + np.float32(0.5)
    )
    codes = (
        xp.clip(codes, 0, 15)
        .astype(xp.uint8)
        .reshape(*kernel.shape[:axis], -1, *kernel.shape[in_axes:])
    )
    codes = xp.take(codes, xp.arange(size), axis=axis)
    stats = (scale.astype(xp.float16), low.astype(xp.float16))
    return dict(zip(LEAVES["q4_1"], (pack(codes, kernel.shape, in_axes), *stats)))


_QUANTIZERS = {"int8": _quantize_int8, "nf4": _quantize_nf4, "q4_1": _quantize_q4_1}


def pack(codes: Any, shape: tuple[int, ...], in_axes: int) -> Any:
    """4-bit codes of a kernel of `shape` ([*in, *out], or [>= n_in, n_out] flat) -> uint8
    [*in[:-1], in[-1]/2, *out], two consecutive codes of the last input dim per byte, the
    first in the high nibble (bitsandbytes' order)."""
    in_shape, out_shape = shape[:in_axes], shape[in_axes:]
    if in_shape[-1] % 2:
        raise ValueError(
            f"a kernel of shape {tuple(shape)} has an odd last input dim: 4-bit codes pack two "
            "per byte along it; leave this kernel out of peft.quantize_targets"
        )
    n_in = math.prod(in_shape)
    codes = codes.reshape(-1, math.prod(out_shape))[:n_in]
    pairs = codes.reshape(*in_shape[:-1], in_shape[-1] // 2, 2, -1)
    packed = (pairs[..., 0, :] << 4) | pairs[..., 1, :]
    return packed.reshape(*in_shape[:-1], in_shape[-1] // 2, *out_shape)


def _unpack(packed: jax.Array, axis: int) -> jax.Array:
    """`pack`'s inverse along the packed `axis`: uint8 codes of twice its size there."""
    pairs = jnp.stack([packed >> 4, packed & 15], axis=axis + 1)
    return pairs.reshape(*packed.shape[:axis], 2 * packed.shape[axis], *packed.shape[axis + 1 :])


def _quantize_absmax(absmax: Any, xp: Any) -> tuple[Any, Any, Any]:
    """Double quantization of the block absmaxes [blocks, out]: (uint8 codes [blocks, out],
    f32 scale per group of 256, f32 mean). Groups run over bitsandbytes' block order
    (output feature major), so the codes equal its `quantize_blockwise(absmax - mean, 256)`."""
    blocks, n_out = absmax.shape
    offset = xp.mean(absmax, dtype=xp.float32)
    centered = (absmax - offset).T.reshape(-1)
    groups = -(-centered.shape[0] // ABSMAX_GROUP)
    padded = xp.pad(centered, (0, groups * ABSMAX_GROUP - centered.shape[0]))
    padded = padded.reshape(groups, ABSMAX_GROUP)
    scale = xp.max(xp.abs(padded), axis=1)
    codes = _nearest(_scaled(padded, scale[:, None], xp), DYNAMIC_VALUES, xp)
    codes = codes.reshape(-1)[: blocks * n_out].reshape(n_out, blocks).T
    return codes, scale.astype(xp.float32), offset.astype(xp.float32)


def dequantize(method: str, leaves: Mapping[str, jax.Array]) -> jax.Array:
    """The float32 kernel [*in, *out] that `leaves` stand for: one layer's for NF4; int8's and
    Q4_1's may also be stacked (a leading layer axis: their maths is the same per layer)."""
    if method == "int8":
        codes, scale = (leaves[name] for name in LEAVES["int8"])
        return codes.astype(jnp.float32) * scale
    if method == "q4_1":
        return _dequantize_q4_1(*(leaves[name] for name in LEAVES["q4_1"]))
    packed, absmax_codes, scale, offset = (leaves[name] for name in LEAVES["nf4"])
    out_dims = absmax_codes.ndim - 1
    in_dims = packed.ndim - out_dims
    out_shape = packed.shape[in_dims:]
    in_shape = (*packed.shape[: in_dims - 1], 2 * packed.shape[in_dims - 1])
    n_in, n_out, blocks = math.prod(in_shape), math.prod(out_shape), absmax_codes.shape[0]
    codes = _unpack(packed, in_dims - 1).reshape(n_in, n_out)
    values = jnp.pad(jnp.asarray(NF4_VALUES)[codes], ((0, blocks * NF4_BLOCK - n_in), (0, 0)))
    absmax = _dequantize_absmax(absmax_codes, scale, offset)
    kernel = values.reshape(blocks, NF4_BLOCK, n_out) * absmax[:, None, :]
    return kernel.reshape(blocks * NF4_BLOCK, n_out)[:n_in].reshape(*in_shape, *out_shape)


def _dequantize_q4_1(packed: jax.Array, scale: jax.Array, low: jax.Array) -> jax.Array:
    """codes * scale + min, per run of 32 along the last input dim: the one dim where the
    packed codes (half its size) and the statistics (a 32nd) differ, counted from either
    end, so leading (stacked) dims need no telling."""
    axis = next(i for i, (c, s) in enumerate(zip(packed.shape, scale.shape)) if c != s)
    codes = _unpack(packed, axis)  # [..., in_last, *out]
    size, blocks = codes.shape[axis], scale.shape[axis]
    pad = [(0, 0)] * codes.ndim
    pad[axis] = (0, blocks * Q4_1_BLOCK - size)
    runs = jnp.pad(codes.astype(jnp.float32), pad)
    runs = runs.reshape(*codes.shape[:axis], blocks, Q4_1_BLOCK, *codes.shape[axis + 1 :])
    stat = lambda x: jnp.expand_dims(x.astype(jnp.float32), axis + 1)
    kernel = (runs * stat(scale) + stat(low)).reshape(
        *codes.shape[:axis], -1, *codes.shape[axis + 1 :]
    )
    return jax.lax.slice_in_dim(kernel, 0, size, axis=axis)


def _dequantize_absmax(codes: jax.Array, scale: jax.Array, offset: jax.Array) -> jax.Array:
    """The block absmaxes [blocks, n_out] back from their codes [blocks, *out]. Each one's
    group index comes from iotas (not from reshaping the codes into groups), so sharded codes
    are never gathered."""
    blocks = codes.shape[0]
    codes = codes.reshape(blocks, -1)  # [blocks, *out] -> [blocks, n_out]
    order = jnp.arange(codes.shape[1])[None, :] * blocks + jnp.arange(blocks)[:, None]
    return jnp.asarray(DYNAMIC_VALUES)[codes] * scale[order // ABSMAX_GROUP] + offset


def leaf_axes(method: str, names: tuple, in_axes: int) -> dict[str, tuple]:
    """Logical axis names of the leaves of a kernel named `names`: the codes keep the
    kernel's (so they shard like it), int8's scale the output dims'. Per-block statistics
    (NF4's absmaxes, Q4_1's scales and minimums) keep the output dims' and call their blocks
    axis `<first input dim's name>_blocks` (`embed_blocks`): 1/64 (1/32) of that dim, it shards
    like it where that divides and is replicated where it does not (config.sharding.rules
    holds both rules). NF4's small double-quantization scales are replicated."""
    inputs, outputs = names[:in_axes], names[in_axes:]
    if method == "int8":
        return dict(zip(LEAVES["int8"], (names, (None,) * in_axes + outputs)))
    blocked = lambda name: None if name is None else name + BLOCKS_SUFFIX
    if method == "q4_1":  # runs along the last input dim
        stats = (*inputs[:-1], blocked(inputs[-1]), *outputs)
        return dict(zip(LEAVES["q4_1"], (names, stats, stats)))
    return dict(zip(LEAVES["nf4"], (names, (blocked(inputs[0]), *outputs), (None,), ())))


def in_axes_of(method: str, shapes: Mapping[str, tuple[int, ...]], kernel_ndim: int) -> int:
    """How many input dims a kernel of `kernel_ndim` dims has, from its leaves' (one
    layer's) shapes: NF4's absmax is [blocks, *out]; int8's scale is 1 on the input dims
    (a size-1 output dim read as an input one quantizes the same)."""
    if method == "nf4":
        return kernel_ndim - (len(shapes[LEAVES["nf4"][1]]) - 1)
    if method == "q4_1":  # the dim where codes and statistics differ is the last input one
        codes, scale = shapes[LEAVES["q4_1"][0]], shapes[LEAVES["q4_1"][1]]
        return 1 + next(i for i, (c, s) in enumerate(zip(codes, scale)) if c != s)
    scale = shapes[LEAVES["int8"][1]]
    return next((i for i, size in enumerate(scale) if size != 1), len(scale))


def weights(path: str, shape: tuple[int, ...]) -> int:
    """How many weights the param at '/'-joined `path` stands for: a quantized kernel's
    codes count its weights (two per byte of 4-bit codes), its statistics none, any other
    param its size."""
    name, size = path.rsplit("/", 1)[-1], math.prod(shape)
    if name in (LEAVES["nf4"][0], LEAVES["q4_1"][0]):
        return 2 * size
    return 0 if name in LEAF_NAMES and name != LEAVES["int8"][0] else size


def bits_per_weight(method: str, kernel_shape: tuple[int, ...], in_axes: int) -> float:
    """Storage bits per weight of a kernel in `method`'s format (32 for float32)."""
    size = math.prod(kernel_shape)
    n_in, n_out = math.prod(kernel_shape[:in_axes]), math.prod(kernel_shape[in_axes:])
    if method == "int8":
        return 8 + 32 * n_out / size
    if method == "nf4":
        blocks = -(-n_in // NF4_BLOCK) * n_out
        return (4 * size + 8 * blocks + 32 * -(-blocks // ABSMAX_GROUP) + 32) / size
    if method == "q4_1":
        last = kernel_shape[in_axes - 1]
        return (4 * size + 32 * -(-last // Q4_1_BLOCK) * (n_in // last) * n_out) / size
    return 32.0
