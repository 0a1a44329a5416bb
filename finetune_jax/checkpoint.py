"""Orbax checkpoints in `<workdir>/checkpoints`: periodic, async, keep last K + best, resume.

A checkpoint holds two items: `state` (the TrainState: step, params, optimizer state, RNG)
and `progress` (JSON: the data iterator's position, early-stopping bookkeeping). Orbax
writes each step to a temporary directory and renames it when complete, so a crash during
a save leaves the earlier checkpoints as they were.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

STATE, PROGRESS = "state", "progress"


def make_manager(workdir: str, keep: int, metric: str | None, mode: str = "max",
                 async_save: bool = True, read_only: bool = False) -> ocp.CheckpointManager:
  """A manager that keeps the latest `keep` checkpoints plus the best one by `metric`."""
  keep_policies: list[Any] = [policies.LatestN(n=max(keep, 1))]
  if metric:
    keep_policies.append(policies.BestN(
        get_metric_fn=lambda m: m[metric], reverse=(mode == "min"), n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      preservation_policy=policies.AnyPreservationPolicy(keep_policies),
      best_fn=(lambda m: m[metric]) if metric else None, best_mode=mode,
      enable_async_checkpointing=async_save, create=not read_only, read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_names=(STATE, PROGRESS))


def save(manager: ocp.CheckpointManager, state: Any, progress: dict[str, Any],
         metrics: dict[str, float] | None = None, force: bool = False) -> bool:
  """Start saving `state` at its step (async unless the manager is synchronous)."""
  step = int(jax.device_get(state.step))
  return manager.save(step, args=ocp.args.Composite(
      **{STATE: ocp.args.StandardSave(state), PROGRESS: ocp.args.JsonSave(progress)}),
      metrics=metrics, force=force)


def restore_latest(manager: ocp.CheckpointManager, abstract_state: Any
                   ) -> tuple[Any, dict[str, Any]] | None:
  """(state, progress) from the latest finished checkpoint, or None if there is none.

  `abstract_state` is a tree of `jax.ShapeDtypeStruct` carrying the target shardings, so
  arrays land directly where the current mesh wants them.
  """
  step = manager.latest_step()
  if step is None:
    return None
  return restore(manager, step, abstract_state)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any
            ) -> tuple[Any, dict[str, Any]]:
  """(state, progress) saved at `step`."""
  restored = manager.restore(step, args=ocp.args.Composite(
      **{STATE: ocp.args.StandardRestore(abstract_state), PROGRESS: ocp.args.JsonRestore()}))
  return restored[STATE], dict(restored[PROGRESS])


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree`'s leaves with the given shardings attached."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)
