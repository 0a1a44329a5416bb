"""How a model's params correspond to HF checkpoint tensors: mapping rows and their conversion.

A model file describes its checkpoint layout as data, a list of `HFMapping` rows (HF key, our
'/'-joined path, both shapes, whether the torch Linear weight is transposed, the layer of a
stacked param); the functions here apply those rows to in-memory numpy arrays, with the same
shape checks and error messages for every architecture. Reading and writing files is `finetune_jax.hf`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from finetune_jax.tree_paths import get_path, set_path

if TYPE_CHECKING:
    from finetune_jax.models.family import ModelFamily


class HFMapping(NamedTuple):
    """One HF tensor <-> one of our params.

    `transpose` marks torch `nn.Linear` weights ([out, in]) that become Flax kernels
    ([in, out]); after transposing, the array is reshaped to our (possibly split-head) shape.
    `layer` is set for a stacked param (`scan_layers`): the HF tensor fills index `layer`
    along the param's leading layer axis, and `shape` is one layer's slice.
    """

    hf_key: str
    path: str  # our param's '/'-joined path
    hf_shape: tuple[int, ...]
    shape: tuple[int, ...]
    transpose: bool = False
    layer: int | None = None


def linear_rows(
    hf: str, ours: str, out: int, inp: int, shape: tuple, bias: tuple | None
) -> list[HFMapping]:
    """A torch Linear [out, in] -> our kernel (transposed, reshaped to `shape`) and bias
    (reshaped to `bias`; None: the layer has none)."""
    rows = [HFMapping(f"{hf}.weight", f"{ours}/kernel", (out, inp), shape, True)]
    if bias is not None:
        rows.append(HFMapping(f"{hf}.bias", f"{ours}/bias", (out,), bias))
    return rows


def layer_norm_rows(hf: str, ours: str, d: int) -> list[HFMapping]:
    """A torch LayerNorm's weight and bias -> our scale and bias."""
    return [
        HFMapping(f"{hf}.weight", f"{ours}/scale", (d,), (d,)),
        HFMapping(f"{hf}.bias", f"{ours}/bias", (d,), (d,)),
    ]


def attention_rows(hf: str, ours: str, d: int, heads: int, key_bias: bool = False) -> list:
    """q/k/v/out projections of one BART-style attention block (HF `q_proj` ... `out_proj`,
    ours split into heads); Whisper's k_proj has no bias, Marian's has (`key_bias`)."""
    h = d // heads
    rows = []
    for name in ("q_proj", "k_proj", "v_proj"):
        bias = None if name == "k_proj" and not key_bias else (heads, h)
        rows += linear_rows(f"{hf}.{name}", f"{ours}/{name}", d, d, (d, heads, h), bias)
    return rows + linear_rows(f"{hf}.out_proj", f"{ours}/out_proj", d, d, (heads, h, d), (d,))


def block_rows(hf: str, ours: str, d: int, ffn: int, norms: tuple[str, ...]) -> list[HFMapping]:
    """The MLP (`fc1`, `fc2`) and the named LayerNorms of one BART-style layer."""
    rows = linear_rows(f"{hf}.fc1", f"{ours}/fc1", ffn, d, (d, ffn), (ffn,))
    rows += linear_rows(f"{hf}.fc2", f"{ours}/fc2", d, ffn, (ffn, d), (d,))
    for norm in norms:
        rows += layer_norm_rows(f"{hf}.{norm}", f"{ours}/{norm}", d)
    return rows


def stack_layers(rows: list[HFMapping], stacks: Mapping[str, int]) -> list[HFMapping]:
    """Rows of the unrolled layout moved to the stacked one: a row for `<stack>_<i>/rest`
    becomes one for `<stack>/rest` with `layer=i` (`stacks`: stack path -> layer count)."""
    out = []
    for m in rows:
        for stack in stacks:
            if found := re.fullmatch(re.escape(stack) + r"_(\d+)/(.*)", m.path):
                m = m._replace(path=f"{stack}/{found.group(2)}", layer=int(found.group(1)))
                break
        out.append(m)
    return out


def layer_counts(rows: Iterable[HFMapping]) -> dict[str, int]:
    """Stacked param path -> its number of layers (the length of its leading axis)."""
    counts: dict[str, int] = {}
    for m in rows:
        if m.layer is not None:
            counts[m.path] = max(counts.get(m.path, 0), m.layer + 1)
    return counts


def row_value(mapping: HFMapping, value: Any) -> Any:
    """The part of our param `value` that `mapping`'s HF tensor holds (one layer if stacked)."""
    return value if mapping.layer is None else value[mapping.layer]


def row_name(mapping: HFMapping) -> str:
    """Our param path as messages name it, with the layer index of a stacked row."""
    return mapping.path if mapping.layer is None else f"{mapping.path}[{mapping.layer}]"


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


def _under(path: str, prefixes: Iterable[str]) -> str | None:
    """The prefix (a param path or one of its parents) that `path` lies under, or None."""
    return next((p for p in prefixes if path == p or path.startswith(p + "/")), None)


def checkpoint_rows(
    keys: Iterable[str], family: ModelFamily, config: Any
) -> tuple[list[HFMapping], list[str]]:
    """Which checkpoint tensor fills which param: (rows with the file's own keys, absent
    optional prefixes).

    `keys` are the tensor names the checkpoint holds; nothing is read. Rows for the family's
    `new_params` are left out (a new head comes from init), and so are `optional_params`
    prefixes of which the checkpoint has no tensor at all (returned, to be initialised).
    A missing tensor is a ValueError naming the HF key, our path and both shapes; with
    `family.strict`, so is a tensor that has no place in the model.
    """
    keys = set(keys)
    rows = [m for m in family.hf_param_mappings(config) if not _under(m.path, family.new_params)]
    strip = family.bare_prefix
    if not strip or any(k.startswith(strip) for k in keys):
        strip = ""  # the file names tensors as the task model does
    rows = [m._replace(hf_key=m.hf_key.removeprefix(strip)) for m in rows]
    if family.strict:
        known = {m.hf_key for m in rows}
        unexpected = sorted(
            k for k in keys if k not in known and not k.endswith(family.ignored_tensors)
        )
        if unexpected:
            raise ValueError(
                f"{len(unexpected)} HF tensors have no place in this config's model, e.g. "
                f"{unexpected[:3]}. Does config.json match the weights?"
            )
    present = {_under(m.path, family.optional_params) for m in rows if m.hf_key in keys}
    found, missing = [], []
    for m in rows:
        if m.hf_key in keys:
            found.append(m)
            continue
        optional = _under(m.path, family.optional_params)
        if optional is not None and optional not in present:
            if optional not in missing:
                missing.append(optional)
            continue
        raise ValueError(
            f"HF tensor {m.hf_key!r} (HF shape {m.hf_shape}) for our param {row_name(m)!r} "
            f"(shape {m.shape}) is missing from the checkpoint."
        )
    return found, missing


def params_from_hf(
    tensors: Mapping[str, np.ndarray], family: ModelFamily, config: Any
) -> tuple[dict[str, Any], list[str]]:
    """HF tensors -> (nested params of every row `checkpoint_rows` finds, absent prefixes).

    Stacked params (rows with `layer`) are filled layer by layer into one array.
    """
    rows, missing = checkpoint_rows(tensors.keys(), family, config)
    params: dict[str, Any] = {}
    counts = layer_counts(rows)
    for m in rows:
        value = hf_to_param(m, tensors[m.hf_key], m.hf_key, row_name(m))
        if m.layer is None:
            set_path(params, m.path, value)
            continue
        try:
            stacked = get_path(params, m.path)
        except KeyError:
            stacked = np.zeros((counts[m.path], *m.shape), np.float32)
            set_path(params, m.path, stacked)
        stacked[m.layer] = value
    return params, missing


def params_to_hf(
    params: Mapping[str, Any], family: ModelFamily, config: Any
) -> dict[str, np.ndarray]:
    """Our unboxed params -> HF tensors with the task model's keys (float32 numpy).

    Rows whose param is absent (e.g. LoRA merged away, a head not built) are skipped; a
    stacked param gives one tensor per layer. The family's `constant_tensors` are added.
    """
    tensors = {k: np.asarray(v, np.float32) for k, v in family.constant_tensors(config).items()}
    for m in family.hf_param_mappings(config):
        try:
            value = get_path(params, m.path)
        except KeyError:
            continue
        tensors[m.hf_key] = param_to_hf(m, row_value(m, value))
    return tensors
