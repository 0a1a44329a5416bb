"""Device mesh and shardings from config data.

Models name their parameter axes logically (`embed`, `heads`, `mlp`, ...); a rules table in
the config maps those names to mesh axes, so the same model code runs data-parallel on one
host or sharded on a pod. A logical name the table does not mention is an error.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from finetune_jax.tree_paths import path_str


def make_mesh(
    mesh_config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device] | None = None,
    dcn_config: ml_collections.ConfigDict | None = None,
) -> Mesh:
    """A Mesh with the config's named axes; one size may be -1 (= the remaining devices).

    Devices are laid out by `jax.experimental.mesh_utils`, which knows the physical
    topology (TPU torus, GPU NVLink islands), so neighbouring mesh coordinates are
    neighbouring chips. `dcn_config` (`config.mesh_dcn`) says how many slices (TPU
    multi-slice) or hosts (GPU) each axis spans over the data-centre network; `mesh` sizes
    are then per slice, and the fast in-slice links carry the axes that talk most.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = [int(dcn_config[name]) if dcn_config else 1 for name in mesh_config.keys()]
    slices = int(np.prod(dcn))
    if slices < 1 or len(devices) % slices:
        raise ValueError(
            f"config.mesh_dcn={dict(dcn_config)} does not divide {len(devices)} devices"
        )
    names, sizes = list(mesh_config.keys()), list(mesh_config.values())
    per_slice = len(devices) // slices
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(mesh_config)}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if known <= 0 or per_slice % known:
        raise ValueError(
            f"config.mesh={dict(mesh_config)} does not divide the {per_slice} devices"
            + (f" of each of {slices} slices" if slices > 1 else "")
        )
    sizes = [per_slice // known if s == -1 else s for s in sizes]
    if int(np.prod(sizes)) != per_slice:
        raise ValueError(
            f"config.mesh={dict(mesh_config)} uses {int(np.prod(sizes))} devices, "
            f"but {per_slice} are present; set one axis to -1"
        )
    if slices > 1:
        # TPUs know their slice; on GPUs each process (host) is one DCN granule.
        granule = not hasattr(devices[0], "slice_index")
        grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn, devices, process_is_granule=granule)
    else:
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    return Mesh(grid, names)


def logical_rules(config: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """The logical-axis -> mesh-axis table of the config, as a list of pairs."""
    return [tuple(rule) for rule in config.sharding.rules]


def batch_sharding(mesh: Mesh, logical_rules: Sequence[tuple[str, Any]]) -> NamedSharding:
    """Batch arrays split along their leading axis as the rules place the `batch` axis."""
    spec = nn.logical_to_mesh_axes(("batch",), list(logical_rules))
    return NamedSharding(mesh, spec)


def check_batch_size(batch_size: int, microbatches: int, batch_sharding: NamedSharding) -> None:
    """The global batch (and each microbatch) must split evenly over the batch mesh axes."""
    mesh, axes = batch_sharding.mesh, batch_sharding.spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = int(np.prod([mesh.shape[a] for a in axes]))
    if microbatches < 1 or batch_size % microbatches:
        raise ValueError(
            f"train.batch_size={batch_size} does not split into train.microbatches={microbatches}"
        )
    if (batch_size // microbatches) % ways:
        raise ValueError(
            f"train.batch_size={batch_size} / train.microbatches={microbatches} is not divisible by "
            f"the {ways} devices the batch is split over (mesh axes {axes} of {dict(mesh.shape)})"
        )


class MeshBound:
    """A jitted function called under `jax.set_mesh(mesh)`.

    The models constrain activations with logical names (`nn.with_logical_constraint`), which
    needs a mesh while tracing; binding it here keeps that out of model code and out of
    global state. Attribute access (`lower`, `_cache_size`) goes to the jitted function.
    """

    def __init__(self, jitted: Any, mesh: Mesh, logical_rules: Sequence[tuple[str, Any]]):
        self._jitted, self._mesh, self._rules = jitted, mesh, list(logical_rules)

    def __call__(self, *args: Any) -> Any:
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            return self._jitted(*args)

    def lower(self, *args: Any) -> Any:
        with jax.set_mesh(self._mesh), nn.logical_axis_rules(self._rules):
            return self._jitted.lower(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def param_shardings(boxed_params: Any, mesh: Mesh, logical_rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for (unboxed) params from their logical names and the rules table."""
    known = {name for name, _ in logical_rules}
    specs = nn.get_partition_spec(boxed_params)
    for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
        for name in spec:
            if name is not None and name not in known:
                raise ValueError(
                    f"logical axis {name!r} is not in config.sharding.rules "
                    f"(known: {sorted(known)}); add a (name, mesh_axis_or_None) rule"
                )
    abstract = nn.meta.unbox(boxed_params)
    specs = jax.tree.map(
        lambda spec, leaf: nn.logical_to_mesh_axes(
            spec, _dividing_rules(spec, leaf.shape, mesh, logical_rules)
        ),
        specs,
        abstract,
        is_leaf=lambda x: isinstance(x, P),
    )
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    _check_divisible(abstract, shardings)
    return shardings


def _dividing_rules(
    names: P, shape: tuple[int, ...], mesh: Mesh, logical_rules: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    """The rules minus those that would split one of this param's dims unevenly, where a
    later rule for the same logical name remains (an alternative the config lists, such as
    `vocab` on `tensor` when fsdp does not divide the vocabulary). A name whose every rule
    fails keeps them all, so `_check_divisible` names the param and what to change."""
    dims = {name: shape[i] for i, name in enumerate(names) if name is not None}

    def divides(name: str, axes: Any) -> bool:
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        return name not in dims or dims[name] % int(np.prod([mesh.shape[a] for a in axes])) == 0

    kept = [(n, a) for n, a in logical_rules if divides(n, a)]
    orphaned = {n for n, _ in logical_rules if n in dims} - {n for n, _ in kept}
    return kept + [(n, a) for n, a in logical_rules if n in orphaned]


def _check_divisible(abstract_params: Any, shardings: Any) -> None:
    """Every sharded dimension must split evenly; name the param, its shape and the axes."""
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_params)
    for (path, leaf), spec_sharding in zip(flat, jax.tree.leaves(shardings)):
        mesh, spec = spec_sharding.mesh, spec_sharding.spec
        for dim, axes in enumerate(spec):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            ways = int(np.prod([mesh.shape[a] for a in axes]))
            if leaf.shape[dim] % ways:
                raise ValueError(
                    f"param {path_str(path)} of shape {tuple(leaf.shape)}: dimension {dim} "
                    f"({leaf.shape[dim]}) is not divisible by mesh axes {axes} ({ways} devices); change "
                    "config.mesh or map that logical axis to None in config.sharding.rules"
                )


def state_shardings(abstract_state: Any, tx: Any, params_sharding: Any, mesh: Mesh) -> Any:
    """Shardings for a TrainState: optimizer moments follow their param, the rest replicate."""
    import optax  # local: keeps this module's import light for launch tools

    masked = optax.transforms.MaskedNode
    # Per-group states of multi_transform hold param-shaped trees with MaskedNode where a param
    # belongs to another group (or is frozen): those stay MaskedNode, the rest follow the param.
    opt_sharding = optax.tree_map_params(
        tx,
        lambda p, s: p if isinstance(p, masked) else s,
        abstract_state.opt_state,
        params_sharding,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, (NamedSharding, masked)),
    )
    return abstract_state.replace(
        step=replicated(mesh), params=params_sharding, opt_state=opt_sharding, rng=replicated(mesh)
    )
