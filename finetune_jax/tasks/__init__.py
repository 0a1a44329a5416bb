"""Task kinds and the tasks they register: `data.task` -> its kind and its task.

Adding a kind means adding its module here (a `TaskKind` subclass and its `KIND`), the head
in each model family that serves it (`family.heads[kind.name]`), tests, and one entry in
`KINDS` below.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from finetune_jax.tasks import (
    causal_lm,
    detection,
    image_classification,
    segmentation,
    speech_recognition,
    text_classification,
    token_classification,
    translation,
)
from finetune_jax.tasks.kind import TaskKind

KINDS: dict[str, TaskKind] = {
    kind.name: kind
    for kind in (
        text_classification.KIND,
        token_classification.KIND,
        causal_lm.KIND,
        image_classification.KIND,
        speech_recognition.KIND,
        translation.KIND,
        segmentation.KIND,
        detection.KIND,
    )
}


def _kind_of_task_name(name: str) -> TaskKind:
    for kind in KINDS.values():
        if name in kind.tasks:
            return kind
    known = ", ".join(sorted(n for kind in KINDS.values() for n in kind.tasks))
    raise ValueError(f"unknown task {name!r} (data.task); known tasks: {known}")


def get_task(name: str) -> Any:
    """The registered task `name` as registered (no `data.*` keys applied)."""
    return _kind_of_task_name(name).tasks[name]


def kind_of(task: Any) -> TaskKind:
    """The kind of a task (every task names its kind)."""
    return KINDS[task.kind]


def task_for(data: ml_collections.ConfigDict) -> Any:
    """The task `config.data` describes: `data.task` with the keys its kind reads applied."""
    return _kind_of_task_name(data.task).configured(data)
