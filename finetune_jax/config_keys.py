"""List a config's keys, their values and what they do:
`python -m finetune_jax.config_keys [--config=configs/x.py] [--config.x=...] [WORD ...]`.

Without --config, the defaults (`finetune_jax/config.py`'s `base_config()`); with one, that
experiment's values, overrides applied. WORDs keep only the keys that contain one of them
(`optim`, `data.files`, `lr`). The help text is the comment written beside or above each key
in `finetune_jax/config.py` (a section's docstring for the section), so the schema and its
documentation stay one file. Every entry point's `--config.<section>.<key>=<value>` sets
any key listed here.
"""

from __future__ import annotations

import ast
import inspect
import io
import textwrap
import tokenize
from collections.abc import Iterator, Sequence

import ml_collections
from ml_collections import config_flags

from finetune_jax import config as config_module
from finetune_jax.cli import OVERRIDE_HELP, run_main
from finetune_jax.training import run_config

WIDTH = 100  # help lines are wrapped to this many columns


def key_help() -> dict[str, str]:
    """{dotted key or section: help text} from the comments of `finetune_jax/config.py`, in
    the order the keys are written there.

    A key's help is the run of comment lines right above its assignment (no blank line
    between; `# -- group --` rulers left out) and the comment at the end of it.
    """
    source = inspect.getsource(config_module)
    comments = _comments(source)
    functions = {
        node.name: node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)
    }
    helps: dict[str, str] = {}
    for name, statement in _assignments(functions["base_config"], "c"):
        maker = getattr(statement.value, "func", None)  # c.optim = _optim()
        if getattr(maker, "id", None) in functions:
            section = functions[maker.id]
            helps[name] = ast.get_docstring(section) or ""
            for key, assignment in _assignments(section, "s"):
                helps[f"{name}.{key}"] = _help_at(comments, assignment)
        else:
            helps[name] = _help_at(comments, statement)
    return helps


def _assignments(function: ast.FunctionDef, target: str) -> Iterator[tuple[str, ast.Assign]]:
    """(attribute, statement) for each `target.attribute = ...` statement of `function`."""
    for statement in function.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            lhs = statement.targets[0]
            if isinstance(lhs, ast.Attribute) and getattr(lhs.value, "id", None) == target:
                yield lhs.attr, statement


def _comments(source: str) -> dict[int, tuple[str, bool]]:
    """{line: (comment text, whether the line holds only the comment)}."""
    lines = source.splitlines()
    found = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            row, column = token.start
            alone = not lines[row - 1][:column].strip()
            found[row] = (token.string.lstrip("#").strip(), alone)
    return found


def _help_at(comments: dict[int, tuple[str, bool]], statement: ast.Assign) -> str:
    above = []
    row = statement.lineno - 1
    while row in comments and comments[row][1]:
        above.insert(0, comments[row][0])
        row -= 1
    above = [line for line in above if not line.startswith("--")]
    inline = [
        text
        for row in range(statement.lineno, statement.end_lineno + 1)
        if row in comments and not comments[row][1]
        for text in [comments[row][0]]
    ]
    return " ".join(above + inline)


def listing(config: ml_collections.ConfigDict, words: Sequence[str] = ()) -> str:
    """`key = value` lines for every key of `config` (those containing one of `words`, if
    given), each followed by its help, indented and wrapped."""
    helps = key_help()
    values = dict(_flat(config))
    order = {key: i for i, key in enumerate(helps)}
    keys = sorted(values, key=lambda k: (order.get(_known_prefix(k, helps), len(order)), k))
    lines, explained = [], set()
    for key in keys:
        if words and not any(word in key for word in words):
            continue
        lines.append(f"{key} = {values[key]!r}")
        known = _known_prefix(key, helps)  # data.files.* share data.files' help: say it once
        if helps.get(known) and known not in explained:
            explained.add(known)
            lines += textwrap.wrap(
                helps[known], WIDTH, initial_indent="    ", subsequent_indent="    "
            )
    return "\n".join(lines)


def _known_prefix(key: str, helps: dict[str, str]) -> str:
    """`key`, or the longest dotted prefix of it with help (`data.files` for
    `data.files.train`)."""
    parts = key.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in helps:
            return prefix
    return key


def _flat(node: ml_collections.ConfigDict, prefix: str = "") -> Iterator[tuple[str, object]]:
    for key in node.keys():
        value = node[key]
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def main() -> None:
    config = config_flags.DEFINE_config_file(
        "config",
        run_config.__file__,  # its get_config() is base_config(): the defaults
        "Experiment config file whose values to list; default: the defaults." + OVERRIDE_HELP,
    )

    def run(argv: list[str]) -> None:
        print(listing(config.value, argv[1:]) or f"no config key contains any of {argv[1:]}")

    run_main(run)


if __name__ == "__main__":
    main()
