"""The package's shape: imports run one way (entry points -> training / evaluation -> models,
data, model files, cluster), and every module says in its first line what it holds."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "finetune_jax"

# What each part may import from the package besides itself. Leaves (config, config_ranges,
# tree_paths, cache_paths, json_values, host_memory, progress) import nothing from the package;
# entry points (train, eval, export, predict, monitor, plot, config_keys, cli) may import anything.
ALLOWED = {
    "config": set(),
    "config_ranges": set(),
    "tree_paths": set(),
    "cache_paths": set(),
    "json_values": set(),
    "host_memory": set(),
    "progress": set(),  # what a person watching a long phase sees
    "models": {"tree_paths"},
    "data": {"cache_paths", "json_values", "progress"},
    "hf": {"models", "tree_paths", "cache_paths"},
    "cluster": {"tree_paths"},
    "evaluation": {"data", "models", "tree_paths", "json_values", "progress"},
    # Task kinds: how each kind is resolved, loaded, scored, predicted and exported.
    "tasks": {"data", "evaluation", "models", "hf", "tree_paths", "json_values"},
    "training": {
        "tasks",
        "evaluation",
        "models",
        "data",
        "hf",
        "cluster",
        "config",
        "config_ranges",
        "tree_paths",
        "json_values",
        "host_memory",
        "progress",
    },
}
ENTRY_POINTS = {
    "train",
    "eval",
    "export",
    "predict",
    "monitor",
    "plot",
    "config_keys",
    "cli",
    "__init__",
}


def _part(path: pathlib.Path) -> str:
    return path.relative_to(PACKAGE).parts[0].removesuffix(".py")


def _imported_parts(path: pathlib.Path) -> set[str]:
    parts = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = node.module.split(".")
            if names[0] == "finetune_jax":
                parts |= {names[1]} if len(names) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            for alias in node.names:
                names = alias.name.split(".")
                if names[0] == "finetune_jax" and len(names) > 1:
                    parts.add(names[1])
    return parts


def test_imports_run_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        part = _part(path)
        if part in ENTRY_POINTS:
            continue
        for imported in _imported_parts(path) - {part}:
            if imported not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports finetune_jax.{imported}")
    assert not wrong, "imports against the layout's direction:\n" + "\n".join(wrong)


def test_every_module_opens_with_a_docstring():
    missing = [
        str(p.relative_to(PACKAGE))
        for p in sorted(PACKAGE.rglob("*.py"))
        if not ast.get_docstring(ast.parse(p.read_text()))
    ]
    assert not missing, f"modules without a docstring saying what they hold: {missing}"
