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
