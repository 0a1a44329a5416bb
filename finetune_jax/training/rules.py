"""Ordered `(regex, value)` rules over '/'-joined parameter paths.

One mechanism for everything that is "data about parameters": freezing, learning-rate
groups, weight-decay masks, (later) LoRA targets and sharding overrides. A rule's regex must
match the *whole* path, the first matching rule wins, and a parameter that no rule matches
is an error naming it -- a catch-all (`".*"`) must be written out explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax

from finetune_jax.tree_paths import param_paths, path_str

Rules = Sequence[tuple[str, Any]]


class RuleError(ValueError):
    """A rule set that does not cover the parameter tree, or is malformed."""


def _compile(rules: Rules, name: str) -> list[tuple[re.Pattern, Any]]:
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise RuleError(f"{name}[{i}] must be a (regex, value) pair, got {rule!r}")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise RuleError(f"{name}[{i}]: invalid regex {rule[0]!r}: {e}") from None
    return compiled


def match(rules: Rules, path: str, name: str = "rules") -> Any:
    """Value of the first rule whose regex full-matches `path`; RuleError if none does."""
    for pattern, value in _compile(rules, name):
        if pattern.fullmatch(path):
            return value
    raise RuleError(
        f"parameter {path!r} is matched by no rule in {name}. Add a rule for it, or an explicit "
        f"catch-all such as ('.*', ...) as the last rule. Rules: {[r[0] for r in rules]}"
    )


def resolve(
    rules: Rules, tree: Any, name: str = "rules", transform: Callable[[Any], Any] | None = None
) -> Any:
    """A tree shaped like `tree` whose leaves are the matched rule values.

    `transform`, if given, maps each matched value (e.g. a label string to a float).
    Raises RuleError naming every unmatched parameter path (not just the first).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    values = resolve_paths(rules, [path_str(path) for path, _ in leaves], name, transform)
    return jax.tree_util.tree_unflatten(treedef, values)


def resolve_paths(
    rules: Rules,
    paths: Sequence[str],
    name: str = "rules",
    transform: Callable[[Any], Any] | None = None,
) -> list[Any]:
    """The matched rule value of each '/'-joined path, in order (see `resolve`)."""
    compiled = _compile(rules, name)
    values, unmatched = [], []
    for p in paths:
        for pattern, value in compiled:
            if pattern.fullmatch(p):
                values.append(transform(value) if transform else value)
                break
        else:
            unmatched.append(p)
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (
            f" ... ({len(unmatched)} in all)" if len(unmatched) > 8 else ""
        )
        raise RuleError(
            f"{name}: {len(unmatched)} parameter(s) matched by no rule: {shown}. Add rules for them "
            f"or an explicit catch-all ('.*', ...) as the last rule. Rules: {[r[0] for r in rules]}"
        )
    return values


def unused_rules(rules: Rules, tree: Any) -> list[str]:
    """Regexes that win for no parameter (usually a typo in a config); for warnings."""
    return unused_rules_of_paths(rules, param_paths(tree))


def unused_rules_of_paths(rules: Rules, paths: Sequence[str]) -> list[str]:
    """`unused_rules` over '/'-joined paths."""
    compiled = _compile(rules, "rules")
    used = set()
    for p in paths:
        for i, (pattern, _) in enumerate(compiled):
            if pattern.fullmatch(p):
                used.add(i)
                break
    return [r[0] for i, r in enumerate(rules) if i not in used]


def as_pairs(items: Iterable[Any]) -> list[tuple[str, Any]]:
    """Normalise rules coming from a ConfigDict (lists or tuples) into (regex, value) tuples."""
    return [tuple(item) for item in items]
