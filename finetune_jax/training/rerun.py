"""What running `train` again on an existing workdir does, decided before anything is built.

- A finished run (its `summary.json` says it reached its end step, or stopped early, and its
  latest checkpoint is that step) is not rerun: the summary is kept and returned.
- A config that changes what the checkpoint's state holds (`STATE_KEYS`: which params train,
  LoRA, storage dtypes) is one clear error naming the keys, before Orbax would fail on the
  tree's structure.
- A changed lr schedule (`SCHEDULE_KEYS`, e.g. a raised `train.max_steps`) is allowed, and
  printed: the schedule is a function of max_steps, so raising it stretches the decay and the
  lr at the resumed step changes (the note gives it before and after).

The previous config is the workdir's `config.json` (the resolved config of its last start).
"""

from __future__ import annotations

import json
import os
from typing import Any

import ml_collections

from finetune_jax.training import checkpoints, optim, workdir_files
from finetune_jax.training.run_log import say

SUMMARY, CONFIG = "summary.json", "config.json"
# Keys that decide the structure of the checkpointed state (which leaves are trainable and
# so hold optimizer state, LoRA leaves, stacked layers, storage dtypes).
STATE_KEYS = (
    "optim.preset",
    "optim.rules",
    "optim.top_k",
    "optim.head",
    "optim.layer",
    "optim.state_dtype",
    "optim.bf16_rounding",
    "peft.method",
    "peft.rank",
    "peft.targets",
    "peft.feedforward",
    "peft.num_virtual_tokens",
    "model.scan_layers",
    "model.param_dtype",
)
# Keys the lr schedule is computed from.
SCHEDULE_KEYS = (
    "train.max_steps",
    "optim.lr",
    "optim.schedule",
    "optim.warmup_fraction",
)


def check_workdir(
    config: ml_collections.ConfigDict, workdir: str, end: int
) -> dict[str, Any] | None:
    """What a (re)start on `workdir` does, decided from its files before the model loads:
    the kept summary of a finished run (to return as it is), an error for a config whose
    state does not fit the checkpoint, a note for a changed lr schedule; None: go on."""
    latest, previous = checkpoints.latest_step(workdir), previous_config(workdir)
    finished = finished_summary(workdir, end, latest)
    if finished is not None:
        say(
            f"{workdir} already finished at step {latest} ({finished['stopped_by'] or 'max_steps'}"
            "); its summary.json is kept. Raise train.max_steps to train on, or use a new workdir"
        )
        return finished
    if latest is not None:
        check_state_keys(previous, config, workdir)
        note = schedule_note(previous, config, latest)
        if note:
            say(note)
    return None


def previous_config(workdir: str | os.PathLike) -> dict[str, Any] | None:
    """The resolved config of the workdir's last start, as written (None for a new workdir)."""
    return workdir_files.read_json(workdir_files.workdir_path(workdir) / CONFIG)


def finished_summary(workdir: str | os.PathLike, end: int, latest_step: int | None) -> dict | None:
    """The run's summary if it already finished at or after `end` (or stopped early) and its
    latest checkpoint (`latest_step`) is the step the summary reports; otherwise None."""
    summary = workdir_files.read_json(workdir_files.workdir_path(workdir) / SUMMARY)
    if summary is None or latest_step is None or summary.get("final_step") != latest_step:
        return None
    stopped_by = summary.get("stopped_by")
    if stopped_by == "early stopping" or (stopped_by is None and latest_step >= end):
        return summary
    return None


def check_state_keys(
    previous: dict[str, Any] | None, config: ml_collections.ConfigDict, workdir: str
) -> None:
    """A ValueError naming every state-shaping key that differs from the checkpointed run."""
    changed = _changes(previous, config, STATE_KEYS)
    if changed:
        raise ValueError(
            f"{workdir} holds checkpoints trained with "
            + ", ".join(f"{k}={old!r}" for k, old, _ in changed)
            + "; the config now says "
            + ", ".join(f"{k}={new!r}" for k, _, new in changed)
            + ". The checkpoint's state does not fit the new setting: use a new --workdir "
            "(e.g. for another preset), or pass the old values to resume"
        )


def schedule_note(
    previous: dict[str, Any] | None, config: ml_collections.ConfigDict, step: int
) -> str | None:
    """A note saying how the lr schedule changed since the checkpointed run (None if not)."""
    changed = _changes(previous, config, SCHEDULE_KEYS)
    if not changed:
        return None
    old_optim = ml_collections.ConfigDict(previous["optim"])
    old_lr = float(optim.schedule(old_optim, previous["train"]["max_steps"])(step))
    new_lr = float(optim.schedule(config.optim, config.train.max_steps)(step))
    return (
        "note: the lr schedule changed since the checkpoint ("
        + ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changed)
        + f"): the run resumes at step {step} on the new schedule, lr there "
        f"{old_lr:.4g} -> {new_lr:.4g}, decaying to step {config.train.max_steps}"
    )


def _changes(
    previous: dict[str, Any] | None, config: ml_collections.ConfigDict, keys: tuple[str, ...]
) -> list[tuple[str, Any, Any]]:
    """(key, previous value, new value) for each of `keys` that differs, compared as the
    config.json holds them (tuples as lists)."""
    if previous is None:
        return []
    now = json.loads(workdir_files.json_text(config.to_dict(), default=str))
    changed = []
    for key in keys:
        old, new = _get(previous, key), _get(now, key)
        if old is not _MISSING and old != new:
            changed.append((key, old, new))
    return changed


_MISSING = object()


def _get(tree: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _MISSING
        tree = tree[part]
    return tree
