"""Stream a pretrained checkpoint (HF safetensors directory or GGUF file) into sharded params.

One mechanism for every model family: the family's `HFMapping` rows say which checkpoint
tensor fills which param. Tensors are read one at a time in their stored dtype, converted to
our layout and dtype, and placed with `jax.make_array_from_callback`, so each process keeps
only the shards its devices hold plus one checkpoint tensor in flight. A kernel the model
stores quantized (`peft.quantize`) is quantized on the host as its tensor arrives (a GGUF's
own Q4_1 blocks are kept as they are), so only its quantized leaves are ever placed. Params
the checkpoint does not have (a new task head, an absent optional pooler, adapters) come
from the family's init with the run's seed, computed under jit straight into their
shardings; the adapters that start from the pretrained weights (DoRA's magnitudes, prompt
tuning's virtual tokens) are then computed from them (`adapter_values`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from finetune_jax import tree_paths
from finetune_jax.hf import model_files
from finetune_jax.models import hf_mapping, prompt_tuning, quantization, quantized_kernels
from finetune_jax.models import lora as lora_lib
from finetune_jax.models.family import ModelFamily


def abstract_params(family: ModelFamily, config: Any) -> Any:
    """Unboxed shapes and dtypes of every param (`jax.eval_shape` of the init: no memory)."""
    init = lambda rng: nn.meta.unbox(family.init_params(config, rng))
    return jax.eval_shape(init, jax.random.PRNGKey(0))


def fresh_paths(
    family: ModelFamily, config: Any, missing: list[str], param_paths: list[str]
) -> list[str]:
    """Params initialised rather than loaded: new head, absent optional parts, adapter
    leaves (found among `param_paths`, every param's path) but those `adapter_values`
    computes from the loaded weights (a random draw of every kernel just to take norms of
    would cost its init's compile)."""
    paths = [*family.new_params, *missing]
    if config.lora is not None:
        paths += [
            p
            for p in lora_lib.adapter_paths(param_paths)
            if p.rsplit("/", 1)[-1] not in lora_lib.DERIVED_LEAVES
        ]
    return paths


def init_values(
    family: ModelFamily, config: Any, seed: int, paths: list[str], shardings: Mapping[str, Any]
) -> dict[str, jax.Array]:
    """Init values of only the '/'-joined `paths` (each a param or a subtree), equal to
    `init_params(seed)`'s, born in their shardings.

    Under jit XLA drops the random draws for everything not returned, so a new head costs
    nothing like initialising the 30k x 384 embedding just to overwrite it.
    """
    leaves = [p for p in shardings if any(p == q or p.startswith(q + "/") for q in paths)]
    if not leaves:  # e.g. a resume streaming only frozen base weights: nothing to trace
        return {}

    def init(rng: jax.Array) -> dict[str, jax.Array]:
        params = nn.meta.unbox(family.init_params(config, rng))
        return {path: tree_paths.get_path(params, path) for path in leaves}

    out_shardings = {path: shardings[path] for path in leaves}
    return jax.jit(init, out_shardings=out_shardings)(jax.random.PRNGKey(seed))


def _place(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array from a host value: each local device gets (a copy of) its slice only."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _place_stacked(
    leaves: Mapping[str, Any],
    shardings: Mapping[str, jax.sharding.Sharding],
    layer_values: Callable[[int], Mapping[str, np.ndarray]],
) -> dict[str, jax.Array]:
    """Params stacked along their leading (layer) axis (`leaves`: path -> shape and dtype),
    built from one layer at a time: `layer_values(i)` gives layer i of each (one checkpoint
    tensor, or the quantized leaves of one kernel).

    Each local device's shard (its layers x its slice of the rest) is filled on the host
    layer by layer and then placed, so the host holds this process's shards of these params
    plus one layer's values; no per-layer device arrays are stacked afterwards (which held
    every layer twice).
    """
    key = lambda index: tuple((s.start, s.stop) for s in index)
    shards: dict[str, dict[tuple, tuple[range, tuple, np.ndarray]]] = {}
    index_maps = {}
    for path, leaf in leaves.items():
        shape = leaf.shape
        index_maps[path] = shardings[path].addressable_devices_indices_map(shape)
        shards[path] = {}
        for index in index_maps[path].values():
            if key(index) not in shards[path]:
                layers = range(*index[0].indices(shape[0]))
                rest = index[1:]
                size = [len(range(*sl.indices(n))) for sl, n in zip(rest, shape[1:])]
                buffer = np.empty((len(layers), *size), leaf.dtype)
                shards[path][key(index)] = (layers, rest, buffer)
    for layer in range(next(iter(leaves.values())).shape[0]):
        values = layer_values(layer)
        for path, by_index in shards.items():
            for layers, rest, buffer in by_index.values():
                if layer in layers:
                    buffer[layer - layers.start] = values[path][rest]
        del values
    placed = {}
    for path, index_map in index_maps.items():
        arrays = [jax.device_put(shards[path][key(index)][2], d) for d, index in index_map.items()]
        placed[path] = jax.make_array_from_single_device_arrays(
            leaves[path].shape, shardings[path], arrays
        )
    return placed


def load_params(
    family: ModelFamily,
    config: Any,
    model_ref: str,
    shardings: Mapping[str, Any] | None = None,
    seed: int = 0,
    replace: Mapping[str, np.ndarray] | None = None,
    random_init: bool = False,
    only: Collection[str] | None = None,
) -> dict[str, Any]:
    """Params of `family` with `config` from the checkpoint at `model_ref`, as jax Arrays.

    `shardings` maps '/'-joined param paths to their shardings (default: the first device);
    `replace` gives host values for some paths instead (e.g. a head bias set from the data).
    `random_init`: every param from the family's init with `seed`, no checkpoint read
    (`model.init=random`). Every param's dtype is the config's `param_dtype`.
    `only`: the paths to load and return (default: every param), e.g. the frozen params a
    slim run checkpoint lacks; no other checkpoint tensor is read. Adapter leaves computed
    from other params (`adapter_values`) need those, so asking for one loads them all.
    """
    abstract = lora_lib.flat_paths(abstract_params(family, config))
    if shardings is None:
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        shardings = dict.fromkeys(abstract, device)
    wanted = set(abstract if only is None else only)
    if not any(p.rsplit("/", 1)[-1] in lora_lib.DERIVED_LEAVES for p in wanted):
        shardings = {path: s for path, s in shardings.items() if path in wanted}
    replace = {path: v for path, v in (replace or {}).items() if path in shardings}
    if random_init:
        values = init_values(family, config, seed, list(abstract), shardings)
    else:
        values = _checkpoint_values(family, config, model_ref, abstract, shardings, seed, replace)
    for path, value in replace.items():
        values[path] = _place(np.asarray(value, abstract[path].dtype), shardings[path])
    values.update(adapter_values(family, config, seed, values, abstract, shardings))
    absent = sorted(set(shardings) - set(values))
    if absent:
        raise ValueError(f"{model_ref}: no checkpoint tensor or init for params {absent[:4]}")
    return lora_lib.nested({path: v for path, v in values.items() if path in wanted})


def _checkpoint_values(
    family: ModelFamily,
    config: Any,
    model_ref: str,
    abstract: Mapping[str, Any],
    shardings: Mapping[str, Any],
    seed: int,
    replace: Mapping[str, np.ndarray],
) -> dict[str, jax.Array]:
    """Every param the checkpoint holds (bar `replace`'s), streamed one tensor at a time, and
    the fresh ones (new head, absent optional parts, LoRA) from the init."""
    _, tensors = model_files.open_tensors(model_ref)
    try:
        rows, missing = hf_mapping.checkpoint_rows(tensors.keys(), family, config)
        if missing:
            logging.warning(
                "%s has no weights for %s; keeping freshly initialised values.", model_ref, missing
            )
        values = init_values(
            family, config, seed, fresh_paths(family, config, missing, list(abstract)), shardings
        )

        def host_values(m: hf_mapping.HFMapping) -> dict[str, np.ndarray]:
            return _stored(m, tensors, abstract)

        stacked: dict[str, dict[int, hf_mapping.HFMapping]] = {}  # path -> layer -> row
        for m in rows:
            if m.path in replace or not any(  # replaced, or not asked for
                p in shardings for p in _stored_paths(m.path, abstract)
            ):
                continue
            if m.layer is None:  # one checkpoint tensor in flight at a time
                for path, value in host_values(m).items():
                    values[path] = _place(value, shardings[path])
            else:
                stacked.setdefault(m.path, {})[m.layer] = m
        for path, by_layer in stacked.items():
            leaves = {p: abstract[p] for p in _stored_paths(path, abstract)}
            values.update(
                _place_stacked(leaves, shardings, lambda i, rows=by_layer: host_values(rows[i]))
            )
    finally:
        tensors.close()
    return values


def _stored_paths(path: str, abstract: Mapping[str, Any]) -> list[str]:
    """The params that hold checkpoint tensor `path`: itself, or a quantized kernel's
    leaves."""
    layer = path.rpartition("/")[0]
    method = quantized_kernels.method_of(layer, abstract)
    if method is None or not path.endswith("/kernel"):
        return [path]
    return [f"{layer}/{name}" for name in quantization.LEAVES[method]]


def _stored(
    m: hf_mapping.HFMapping, tensors: Any, abstract: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """{param path: host value} of checkpoint tensor `m` (one layer of a stacked param),
    converted to our layout: cast to its param's dtype, or the leaves of a quantized kernel,
    quantized right here on the host (no float copy of the kernel is kept) or, where the file
    stores the tensor in that very format (a Q4_1 GGUF), its own blocks as they are."""
    convert = lambda: hf_mapping.hf_to_param(
        m, tensors.get(m.hf_key), m.hf_key, hf_mapping.row_name(m)
    )
    paths = _stored_paths(m.path, abstract)
    if paths == [m.path]:
        return {m.path: convert().astype(abstract[m.path].dtype)}
    layer = m.path.rpartition("/")[0]
    method = quantized_kernels.method_of(layer, abstract)
    first = 0 if m.layer is None else 1  # a stacked leaf's layer axis
    shapes = {p.rpartition("/")[2]: abstract[p].shape[first:] for p in paths}
    in_axes = quantization.in_axes_of(method, shapes, len(m.shape))
    leaves = _file_blocks(m, tensors.blocks(m.hf_key, method), in_axes)
    if leaves is None:
        leaves = quantization.quantize(method, convert(), in_axes)
    return {f"{layer}/{name}": leaf for name, leaf in leaves.items()}


def _file_blocks(
    m: hf_mapping.HFMapping, blocks: dict[str, np.ndarray] | None, in_axes: int
) -> dict[str, np.ndarray] | None:
    """A checkpoint's own Q4_1 blocks of a torch Linear weight (`GGUFTensors.blocks`) as our
    Q4_1 leaves, or None (none stored, or runs that would straddle our kernel's last input
    dim: the float values are quantized instead)."""
    in_shape, out_shape = m.shape[:in_axes], m.shape[in_axes:]
    if blocks is None or not m.transpose or in_shape[-1] % quantization.Q4_1_BLOCK:
        return None
    codes = hf_mapping.hf_to_param(m, blocks["codes"], m.hf_key, hf_mapping.row_name(m))
    runs = (*in_shape[:-1], in_shape[-1] // quantization.Q4_1_BLOCK, *out_shape)
    stats = [np.ascontiguousarray(blocks[k].T).reshape(runs) for k in ("scale", "min")]
    packed = quantization.pack(codes.astype(np.uint8), m.shape, in_axes)
    return dict(zip(quantization.LEAVES["q4_1"], (packed, *stats)))


def adapter_values(
    family: ModelFamily,
    config: Any,
    seed: int,
    values: Mapping[str, jax.Array],
    abstract: Mapping[str, Any],
    shardings: Mapping[str, Any],
) -> dict[str, jax.Array]:
    """The adapter params that start from the pretrained weights (`abstract`: every param's
    shape and dtype), computed from the loaded `values` under jit, born in their shardings:
    DoRA's magnitudes ||W + s A B|| (= ||W||, B being zero) and prompt tuning's virtual
    tokens (rows of the word embeddings for random token ids drawn from `seed`)."""
    lora = config.lora
    derived = {
        p: a
        for p, a in abstract.items()
        if p in shardings and p.rsplit("/", 1)[-1] in lora_lib.DERIVED_LEAVES
    }
    if lora is None or not derived:
        return {}

    def compute(flat: dict[str, jax.Array]) -> dict[str, jax.Array]:
        if lora.method == "prompt":
            return prompt_tuning.initial_values(flat, family.word_embeddings, seed, derived)
        return lora_lib.dora_magnitudes(flat, lora.scale, derived)

    out_shardings = {path: shardings[path] for path in derived}
    return jax.jit(compute, out_shardings=out_shardings)(dict(values))


def load_pretrained(
    family: ModelFamily,
    model_ref: str,
    task_kind: str,
    seed: int = 0,
    **overrides: Any,
) -> tuple[Any, nn.Module, dict[str, Any]]:
    """(config, module, host params) of `family` for `task_kind` from a checkpoint.

    `overrides` set config fields (dtype, param_dtype, remat, lora, num_labels, dropout...).
    For tests, tools and notebooks on one device: training streams params straight into
    their shardings with `load_params` instead.
    """
    family = family.with_head(task_kind)
    hf_config = model_files.read_config(model_ref)
    config = model_config(family, hf_config, model_ref, **overrides)
    module = family.module_for(config)
    params = load_params(family, config, str(model_ref), seed=seed)
    return config, module, jax.tree.map(np.asarray, jax.device_get(params))


def model_config(family: ModelFamily, hf_config: dict[str, Any], source: Any, **overrides) -> Any:
    """The family's config from an HF config dict, checking the model type first."""
    model_type = hf_config.get("model_type", family.model_types[0])
    if model_type not in family.model_types:
        raise ValueError(f"{source} holds model_type {model_type!r}, not {family.model_types}")
    return family.config_from_hf(hf_config, **overrides)
