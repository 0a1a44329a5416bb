"""'/'-joined parameter paths: the names every rule (freezing, LoRA targets, sharding) matches.

A leaf module: it imports nothing from the package, so models, training and cluster code all
use the same path strings.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def path_str(path: tuple[Any, ...]) -> str:
    """'/'-joined name of a pytree key path (dict keys, attributes, sequence indices)."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        else:
            parts.append(str(key))
    return "/".join(parts)


def param_paths(tree: Any) -> list[str]:
    """All leaf paths of a pytree, '/'-joined, in tree order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [path_str(p) for p, _ in leaves]


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


# Stacked layers (`model.scan_layers`): one leaf holds every layer of a stack along a leading
# axis. `stacks` maps a stack's path (e.g. "model/layers") to its layer count; layer i of it
# is named as in the unrolled layout ("model/layers_3/..."), so rules written against
# per-layer paths keep meaning the same thing in both layouts.


def layer_path(stack: str, index: int) -> str:
    """The unrolled-layout name of layer `index` of `stack` ("model/layers" -> "model/layers_3")."""
    return f"{stack}_{index}"


def stack_of(path: str, stacks: Mapping[str, int]) -> str | None:
    """The stack whose stacked leaves `path` lies under, or None."""
    return next((s for s in stacks if path.startswith(s + "/")), None)


def virtual_paths(path: str, stacks: Mapping[str, int]) -> list[str]:
    """The per-layer paths a leaf stands for: one per layer for a stacked leaf
    ("model/layers/mlp/up_proj/kernel" -> "model/layers_0/mlp/up_proj/kernel", ...), else [path]."""
    stack = stack_of(path, stacks)
    if stack is None:
        return [path]
    rest = path[len(stack) :]
    return [layer_path(stack, i) + rest for i in range(stacks[stack])]
