"""Pieces shared by model files: activations, attention masks, HF weight-mapping helpers.

Everything here is architecture-neutral. A model file describes its checkpoint layout as a
list of `HFMapping` rows and lets `convert_from_hf` / `convert_to_hf` do the bookkeeping, so
shape checks and error messages are the same for every architecture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from finetune_jax.peft import LORA_A, LORA_B, LoraConfig, lora_delta, lora_initializers

# HF `hidden_act` names -> functions. HF's "gelu" is the exact erf form; the tanh
# approximation goes by several names across checkpoints.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Returns the activation function for an HF `hidden_act` name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"Unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}"
        ) from None


def additive_attention_mask(attention_mask_BL: jax.Array) -> jax.Array:
    """[B, L] 0/1 key mask -> [B, 1, 1, L] float32 bias to add to attention scores.

    Like HF, masked keys get the most negative float32 rather than -inf, so a row whose
    keys are all masked (pure padding) softmaxes to a uniform row instead of NaN.
    """
    keep_B11L = attention_mask_BL[:, None, None, :].astype(jnp.float32)
    return (1.0 - keep_B11L) * jnp.finfo(jnp.float32).min


# ----------------------------------------------------------------------------- HF weights


class HFMapping(NamedTuple):
    """One HF tensor <-> one of our params.

    `transpose` marks torch `nn.Linear` weights ([out, in]) that become Flax kernels
    ([in, out]); after transposing, the array is reshaped to our (possibly split-head) shape.
    """

    hf_key: str
    path: str  # '/'-joined path inside the converted subtree
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transpose: bool = False


def hf_to_param(mapping: HFMapping, tensor: np.ndarray, hf_name: str, path_name: str) -> np.ndarray:
    """Converts one HF tensor to our layout, checking its shape first."""
    if tuple(tensor.shape) != tuple(mapping.hf_shape):
        raise ValueError(
            f"HF tensor {hf_name!r} has shape {tuple(tensor.shape)}, but our param "
            f"{path_name!r} (shape {mapping.shape}) needs HF shape {mapping.hf_shape}. "
            "Does config.json match the weights?"
        )
    array = np.asarray(tensor, dtype=np.float32)
    if mapping.transpose:
        array = array.T
    return np.ascontiguousarray(array.reshape(mapping.shape))


def param_to_hf(mapping: HFMapping, value: Any) -> np.ndarray:
    """Inverse of `hf_to_param`: our param -> HF layout (float32 numpy)."""
    array = np.asarray(value, dtype=np.float32)
    if mapping.transpose:
        return np.ascontiguousarray(array.reshape(mapping.hf_shape[::-1]).T)
    return np.ascontiguousarray(array.reshape(mapping.hf_shape))


def get_path(tree: Mapping[str, Any], path: str) -> Any:
    """Looks up a '/'-joined path in a nested dict."""
    node: Any = tree
    for part in path.split("/"):
        node = node[part]
    return node


def set_path(tree: dict[str, Any], path: str, value: Any) -> None:
    """Sets a '/'-joined path in a nested dict, creating intermediate dicts."""
    *parents, leaf = path.split("/")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def convert_from_hf(
    tensors: Mapping[str, np.ndarray],
    mappings: Iterable[HFMapping],
    *,
    key_prefix: str,
    path_prefix: str,
    optional_groups: Iterable[str] = (),
) -> tuple[dict[str, Any], list[str]]:
    """Builds a nested param dict from HF tensors.

    A mapping's group is the first component of its path. Groups in `optional_groups`
    (e.g. a pooler some checkpoints drop) may be absent as a whole: they are left out of
    the result and reported in the returned `missing` list as '<path_prefix>/<group>'.
    Any other absent tensor, or a partially present optional group, is a ValueError.
    """
    mappings = list(mappings)
    optional = set(optional_groups)
    present_groups = {m.path.split("/")[0] for m in mappings if key_prefix + m.hf_key in tensors}
    params: dict[str, Any] = {}
    missing: list[str] = []
    for m in mappings:
        group = m.path.split("/")[0]
        hf_name, path_name = key_prefix + m.hf_key, f"{path_prefix}/{m.path}"
        if hf_name not in tensors:
            if group in optional and group not in present_groups:
                if f"{path_prefix}/{group}" not in missing:
                    missing.append(f"{path_prefix}/{group}")
                continue
            raise ValueError(
                f"HF tensor {hf_name!r} (HF shape {m.hf_shape}) for our param {path_name!r} "
                f"(shape {m.shape}) is missing from the checkpoint."
            )
        set_path(params, m.path, hf_to_param(m, tensors[hf_name], hf_name, path_name))
    return params, missing


def convert_to_hf(
    params: Mapping[str, Any], mappings: Iterable[HFMapping], *, key_prefix: str
) -> dict[str, np.ndarray]:
    """Inverse of `convert_from_hf`; groups absent from `params` are skipped."""
    tensors: dict[str, np.ndarray] = {}
    for m in mappings:
        if m.path.split("/")[0] not in params:
            continue
        tensors[key_prefix + m.hf_key] = param_to_hf(m, get_path(params, m.path))
    return tensors


REMAT_POLICIES = {
    "full": None,  # recompute everything in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(module_cls, policy: str, static_argnums: tuple[int, ...] = ()):
    """`module_cls` wrapped in `nn.remat` with a named policy; 'none' returns it unchanged.

    'full' keeps only the block's inputs for the backward pass; 'dots_saveable' also keeps
    the results of weight matmuls, recomputing only cheap elementwise work.
    """
    if policy in ("none", "", None, False):
        return module_cls
    if policy is True:  # older configs said remat=True
        policy = "full"
    if policy not in REMAT_POLICIES:
        raise ValueError(f"model.remat={policy!r} is not one of none, {', '.join(REMAT_POLICIES)}")
    return nn.remat(module_cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


# ----------------------------------------------------------------------------- RMSNorm, RoPE


class RMSNorm(nn.Module):
    """Root-mean-square LayerNorm (no centring, no bias), as in HF's LlamaRMSNorm.

    Statistics are taken in float32 whatever the compute dtype; the normalised value is cast
    to `dtype` before the (float32-stored) scale multiplies it, which is HF's order of casts.
    """

    epsilon: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x_BLD):
        scale_D = self.param(
            "scale",
            nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
            (x_BLD.shape[-1],),
            jnp.float32,
        )
        x32_BLD = x_BLD.astype(jnp.float32)
        variance_BL1 = jnp.mean(jnp.square(x32_BLD), axis=-1, keepdims=True)
        normed_BLD = (x32_BLD * jax.lax.rsqrt(variance_BL1 + self.epsilon)).astype(self.dtype)
        return scale_D.astype(self.dtype) * normed_BLD


# HF `rope_type`s that `rope_inverse_frequencies` implements (transformers' modeling_rope_utils).
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")


def rope_inverse_frequencies(
    head_dim: int,
    theta: float,
    rope_scaling: Mapping[str, Any] | None = None,
    max_position_embeddings: int | None = None,
    seq_len: jax.Array | int | None = None,
) -> jax.Array:
    """float32 [head_dim // 2] inverse frequencies of rotary embeddings, HF-compatible.

    `rope_scaling` holds HF's rope parameters without `rope_theta` (None: plain RoPE). Only
    "dynamic" (NTK) depends on `seq_len`, the largest position + 1 of the current batch; like
    HF it changes nothing until `seq_len` exceeds `max_position_embeddings`.
    """
    scaling = dict(rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"Unsupported rope_type {rope_type!r}; supported: {ROPE_TYPES}")
    # float32 throughout, like torch, so frequencies match HF to the last bit or two.
    exponents = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    if rope_type == "dynamic":
        seq_len = jnp.maximum(jnp.asarray(seq_len, jnp.float32), max_position_embeddings)
        factor = scaling["factor"]
        ratio = factor * seq_len / max_position_embeddings - (factor - 1)
        base = theta * ratio ** (head_dim / (head_dim - 2))
        return 1.0 / (base ** jnp.asarray(exponents))
    inv_freq = np.float32(1.0) / (np.float32(theta) ** exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / np.float32(scaling["factor"])
    elif rope_type == "llama3":
        inv_freq = _llama3_inverse_frequencies(inv_freq, scaling)
    return jnp.asarray(inv_freq, jnp.float32)


def _llama3_inverse_frequencies(inv_freq: np.ndarray, scaling: Mapping[str, Any]) -> np.ndarray:
    """Llama 3.1 frequency-dependent scaling: long wavelengths / factor, short ones kept."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    wavelen = np.float32(2 * np.pi) / inv_freq
    scaled = np.where(wavelen > old_context / low, inv_freq / np.float32(factor), inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / np.float32(factor) + smooth * scaled
    is_medium = ~(wavelen < old_context / high) & ~(wavelen > old_context / low)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(
    positions_BL: jax.Array, inv_freq_K: jax.Array, dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """cos and sin [B, L, 2K] for integer positions, computed in float32, returned in `dtype`.

    The angles repeat once (`[f, f]`), matching the rotate-half convention of `apply_rope`.
    """
    angles_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq_K.astype(jnp.float32)
    angles_BLH = jnp.concatenate([angles_BLK, angles_BLK], axis=-1)
    return jnp.cos(angles_BLH).astype(dtype), jnp.sin(angles_BLH).astype(dtype)


def apply_rope(x_BLNH: jax.Array, cos_BLH: jax.Array, sin_BLH: jax.Array) -> jax.Array:
    """Rotates x [B, L, heads, H] by position, HF's rotate-half layout (dim i pairs i + H/2)."""
    half = x_BLNH.shape[-1] // 2
    rotated_BLNH = jnp.concatenate([-x_BLNH[..., half:], x_BLNH[..., :half]], axis=-1)
    return x_BLNH * cos_BLH[:, :, None, :] + rotated_BLNH * sin_BLH[:, :, None, :]


class DenseND(nn.Module):
    """`x[..., *in] @ kernel[*in, *features] (+ bias[*features])`, params at their full shape.

    Like `nn.DenseGeneral`, but the kernel is initialised at its multi-dimensional shape:
    DenseGeneral initialises a flattened 2-D kernel and reshapes it, which breaks logical
    partitioning names (one per real dimension) as soon as a mesh is active.
    `kernel_init` / `bias_init` carry their logical names (`nn.with_logical_partitioning`);
    `bias_init=None` means no bias. `out_dtype` sets the matmul's result (accumulation)
    dtype, e.g. float32 logits from bf16 inputs; None means the compute dtype.

    With `lora` set and its `targets` full-matching this layer's kernel path, the layer adds
    `scale * ((dropout(x) @ lora_a) @ lora_b)` (see `peft.py`); the frozen kernel's matmul is
    kept separate so no gradient with respect to it is ever formed.
    """

    features: tuple[int, ...]
    kernel_init: Callable
    bias_init: Callable | None = None
    in_axes: int = 1  # how many trailing dims of x are contracted
    dtype: Any = jnp.float32
    out_dtype: Any = None
    lora: LoraConfig | None = None

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        in_shape = x.shape[x.ndim - self.in_axes :]
        kernel_shape = (*in_shape, *self.features)
        kernel = self.param("kernel", self.kernel_init, kernel_shape, jnp.float32)
        x = x.astype(self.dtype)
        contract = (tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes)))
        y = jax.lax.dot_general(
            x,
            kernel.astype(self.dtype),
            (contract, ((), ())),
            preferred_element_type=self.out_dtype,
        )
        if self.bias_init is not None:
            bias = self.param("bias", self.bias_init, self.features, jnp.float32)
            y = y + bias.astype(self.dtype)
        # The path the optimizer and sharding rules see for this kernel (a shared scope,
        # as in BertOutput, makes it the parent's path).
        if self.lora is not None and self.lora.matches("/".join(self.scope.path) + "/kernel"):
            y = y + self._lora_update(x, kernel_shape, deterministic)
        return y

    def _lora_update(self, x: jax.Array, kernel_shape: tuple, deterministic: bool) -> jax.Array:
        """The low-rank term; its params are created after kernel and bias, so adding LoRA
        leaves every other param's init draw unchanged."""
        rank = self.lora.rank
        init_a, init_b = lora_initializers(self.kernel_init, kernel_shape, self.in_axes)
        a = self.param(LORA_A, init_a, (*kernel_shape[: self.in_axes], rank), jnp.float32)
        b = self.param(LORA_B, init_b, (rank, *kernel_shape[self.in_axes :]), jnp.float32)
        if self.lora.dropout > 0:
            # Named: in a scope shared with the parent an auto-named Dropout_0 could clash.
            x = nn.Dropout(self.lora.dropout, name="lora_dropout")(x, deterministic=deterministic)
        return lora_delta(
            x, a.astype(self.dtype), b.astype(self.dtype), self.lora.scale, self.in_axes
        )


def attention_mask(
    attention_mask_BL: jax.Array | None,
    segment_ids_BL: jax.Array | None,
    length: int,
    window: int | None = None,
) -> jax.Array | None:
    """Boolean mask [B|1, 1, L, L] (True = may attend) to apply on top of causality.

    Padding (0 in `attention_mask_BL`) hides keys; packing lets a token see only keys of its
    own segment; a sliding window keeps keys with query index - key index < `window` (HF's
    rule). Returns None when nothing limits attention beyond causality.
    """
    mask = None
    if attention_mask_BL is not None:
        mask = attention_mask_BL.astype(bool)[:, None, None, :]
    if segment_ids_BL is not None:
        same_B1LL = segment_ids_BL[:, None, :, None] == segment_ids_BL[:, None, None, :]
        mask = same_B1LL if mask is None else mask & same_B1LL
    if window is not None:
        index_L = jnp.arange(length)
        near_11LL = (index_L[:, None] - index_L[None, :] < window)[None, None]
        mask = near_11LL if mask is None else mask & near_11LL
    return mask
