"""Pieces shared by model files: activations, attention masks, HF weight-mapping helpers.

Everything here is architecture-neutral. A model file describes its checkpoint layout as a
list of `HFMapping` rows and lets `convert_from_hf` / `convert_to_hf` do the bookkeeping, so
shape checks and error messages are the same for every architecture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
    present_groups = {
        m.path.split("/")[0] for m in mappings if key_prefix + m.hf_key in tensors
    }
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
