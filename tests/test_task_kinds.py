"""The task-kind registry's contracts: every task names a registered kind and carries what the
code reads, every family head serves a registered kind, generic code never branches on a kind's
name, and the README's table of data keys per kind is the one `check_data_keys` enforces."""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest

from finetune_jax import config as config_lib
from finetune_jax import tasks
from finetune_jax.models import FAMILIES
from finetune_jax.tasks.kind import COMMON_DATA_KEYS, TaskKind

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "finetune_jax"
README = PACKAGE.parent / "README.md"
ALL_TASKS = [(kind, name) for kind in tasks.KINDS.values() for name in kind.tasks]


@pytest.mark.parametrize("kind,name", ALL_TASKS, ids=[name for _, name in ALL_TASKS])
def test_every_task_carries_what_the_code_reads(kind, name):
    task = kind.tasks[name]
    assert tasks.kind_of(task) is kind and task.name == name
    assert tasks.get_task(name) is task
    for attribute in ("label_names", "metrics", "main_metric", "quote_none"):
        getattr(task, attribute)  # no getattr defaults anywhere: every task has them
    assert task.main_metric in kind.metric_names(task)


def test_task_names_are_unique_across_kinds():
    names = [name for _, name in ALL_TASKS]
    assert len(names) == len(set(names))


def test_every_family_head_serves_a_registered_kind():
    for family in FAMILIES:
        assert set(family.heads) <= set(tasks.KINDS), family.name
        for kind in family.heads:
            assert family.with_head(kind).head is family.heads[kind]


def test_no_kind_name_is_compared_outside_the_kinds():
    """Generic code asks the kind; a comparison with a kind's name outside `tasks/` (and the
    task dataclasses that declare their kind) is a branch the interface should absorb."""
    names = "|".join(re.escape(name) for name in tasks.KINDS)
    branch = re.compile(rf"(==|!=|\bin)\s*\(?[^#\n]*[\"']({names}|seq2seq|classification)[\"']")
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "tasks":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if "kind" in line and branch.search(line):
                found.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_readme_key_table_is_what_the_kinds_read():
    text = README.read_text()
    header = re.search(r"^\| `data\.` key \|(.*)\|$", text, re.M)
    assert header, "README: the table of data keys per kind is missing"
    kinds = [k.strip() for k in header.group(1).split("|")]
    assert kinds == list(tasks.KINDS)
    rows = re.findall(r"^\| `(\w+)` \|((?: [x ]? \|)+)$", text[header.end() :], re.M)
    table = {key: [c.strip() == "x" for c in cells.split("|")[:-1]] for key, cells in rows}
    keys = [k for k in config_lib.base_config().data if k not in COMMON_DATA_KEYS]
    assert sorted(table) == sorted(keys)
    for key, marks in table.items():
        read = [key in tasks.KINDS[kind].data_keys for kind in kinds]
        assert marks == read, key


@pytest.mark.parametrize("kind", tasks.KINDS.values(), ids=list(tasks.KINDS))
def test_eval_count_is_named_for_what_the_loss_weights_count(kind):
    """An eval reports its summed loss weights under the kind's `eval_count`: rows are
    "examples" (weights [B]), tokens "tokens" (weights [B, T]), never tokens as examples."""
    name = next(iter(kind.tasks))
    config = config_lib.base_config()
    config.data.task, config.data.image_size = name, 32
    task = kind.configured(config.data)
    saved = ("O", "B-x", "I-x")  # class names as a run saves them: none read from files here
    resolved = kind.resolve(config, task, saved if task.label_names is None else None)
    shape, _ = kind.batch_spec(config, resolved)["weights"]
    assert kind.eval_count == {1: "examples", 2: "tokens"}[len(shape)]


@pytest.mark.parametrize("kind", tasks.KINDS.values(), ids=list(tasks.KINDS))
def test_every_kind_takes_what_the_interface_passes(kind):
    """A kind's methods accept the base class's parameters: generic code (predict, eval, the
    builder) calls them with the interface's arguments, whichever kind the run has."""
    for name, base in vars(TaskKind).items():
        own = getattr(type(kind), name)
        if not inspect.isfunction(base) or own is base:
            continue
        expected = list(inspect.signature(base).parameters)
        assert list(inspect.signature(own).parameters) == expected, f"{kind.name}.{name}"
