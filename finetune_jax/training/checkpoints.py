"""Orbax checkpoints in `<workdir>/checkpoints`: periodic, async, keep last K + best, resume.

A checkpoint holds two items: `state` (the TrainState: step, params, optimizer state, RNG)
and `progress` (JSON: the data iterator's position, early-stopping bookkeeping, the open
log window's sums). Orbax writes each step to a temporary directory and renames it when
complete, so a crash during a save leaves the earlier checkpoints as they were.

A slim checkpoint leaves the frozen params out of `state` and records them in `progress`
(`FROZEN`: source, digest, each one's shape, dtype and checksum: `frozen_base.py`); the
caller streams them from the source again and hands them to `restore`. A checkpoint
without that record holds every param (a full one, as every checkpoint did before).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Collection, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import traverse_util
from orbax.checkpoint import checkpoint_managers as policies

from finetune_jax import tree_paths
from finetune_jax.training import workdir_files

STATE, PROGRESS = "state", "progress"
FROZEN = "frozen_base"  # the progress key of a slim checkpoint's record of its frozen params


def make_manager(
    workdir: str | os.PathLike,
    keep: int,
    metric: str | None,
    mode: str = "max",
    async_save: bool = True,
    read_only: bool = False,
) -> ocp.CheckpointManager:
    """A manager that keeps the latest `keep` checkpoints plus the best one by `metric`.

    The directory is an epath.Path, so a `gs://` workdir stays a URL for Orbax (and TensorStore
    writes the arrays with its GCS driver); a local one is made absolute, as Orbax requires.
    """
    keep_policies: list[Any] = [policies.LatestN(n=max(keep, 1))]
    rank = _best_rank(metric, mode) if metric else None
    if metric:
        keep_policies.append(
            policies.BestN(
                get_metric_fn=rank,
                reverse=(mode == "min"),
                n=1,
                keep_checkpoints_without_metrics=False,
            )
        )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policies.AnyPreservationPolicy(keep_policies),
        best_fn=rank,
        best_mode=mode,
        enable_async_checkpointing=async_save,
        create=not read_only,
        read_only=read_only,
        # Set as Orbax forces them when read-only, so eval / export / predict log no warnings.
        save_interval_steps=0 if read_only else 1,
    )
    directory = workdir_files.workdir_path(workdir) / "checkpoints"
    try:
        return ocp.CheckpointManager(
            directory,
            options=options,
            item_handlers={
                # Uncompressed: zstd saves ~5% on float weights but buffers the compressed
                # chunks in RAM (+1.7 GB while saving 2 GB of state) and writes 40% slower.
                STATE: ocp.PyTreeCheckpointHandler(use_compression=False),
                PROGRESS: ocp.JsonCheckpointHandler(),
            },
        )
    except ImportError as e:  # Orbax lists gs:// steps through google-cloud-storage
        raise ImportError(
            f"checkpoints in {directory} need a package that is not installed ({e}); "
            f"{workdir_files.URL_PACKAGES_HINT}"
        ) from e


# The checkpoint's own step, saved with its metrics so ties on the metric can be broken.
_STEP_KEY = "checkpoint_step"


def _best_rank(metric: str, mode: str):
    """Orbax's sort key for "best": the metric, ties going to the EARLIEST step, as early
    stopping (`early_stopping.py`, strict improvement) counts them, so summary.json's
    best_step and `eval --checkpoint=best` name the same checkpoint. Orbax takes the last of
    an ascending sort ("max") or of a descending one ("min"); checkpoints whose metrics hold
    no step tie-break by save order."""
    sign = -1 if mode == "max" else 1
    return lambda m: (m[metric], sign * m.get(_STEP_KEY, 0))


def save(
    manager: ocp.CheckpointManager,
    state: Any,
    progress: dict[str, Any],
    metrics: dict[str, float] | None = None,
    force: bool = False,
    frozen: dict[str, Any] | None = None,
) -> bool:
    """Start saving `state` at its step (async unless the manager is synchronous).

    `frozen`: the record of the frozen params (`frozen_base.record`) for a slim checkpoint:
    those params are left out and the record is saved with the progress.
    A failure here (or of an earlier async save, which Orbax reports at the next save) is a
    CheckpointError: finished checkpoints are complete directories that a failed write
    never touches, so the message says they are intact.
    """
    step = int(jax.device_get(state.step))
    if metrics is not None:
        metrics = {**metrics, _STEP_KEY: step}
    if frozen is not None:
        state = state.replace(params=_without(state.params, frozen["leaves"]))
        progress = {**progress, FROZEN: frozen}
    args = ocp.args.Composite(
        **{STATE: ocp.args.PyTreeSave(state), PROGRESS: ocp.args.JsonSave(progress)}
    )
    with _save_errors(manager, step):
        return manager.save(step, args=args, metrics=metrics, force=force)


def wait(manager: ocp.CheckpointManager) -> None:
    """Block until async saves are written, with the same errors as `save`."""
    with _save_errors(manager, manager.latest_step()):
        manager.wait_until_finished()


def close(manager: ocp.CheckpointManager) -> None:
    """Release the manager's threads and handles (a sweep opens hundreds in one process).
    Cleanup only: call `wait` first, which reports save errors; nothing here raises."""
    with contextlib.suppress(Exception):
        manager.close()


@contextlib.contextmanager
def _save_errors(manager: ocp.CheckpointManager, step: int | None):
    try:
        yield
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(
            f"saving checkpoint step {step} in {manager.directory} failed: {e}. Earlier "
            "finished checkpoints are intact; free disk space or fix the directory, then rerun "
            "the same command to resume from the latest one."
        ) from e


def pick_step(manager, which: str) -> int:
    """The checkpoint step for 'best' / 'latest' / an explicit number, with clear errors."""
    steps = manager.all_steps()
    if not steps:
        raise FileNotFoundError(f"no finished checkpoint in {manager.directory}; train first")
    if which == "latest":
        return max(steps)
    if which == "best":
        return manager.best_step() if manager.best_step() is not None else max(steps)
    if not which.isdigit() or int(which) not in steps:
        raise ValueError(
            f"--checkpoint={which!r}: use best, latest or one of the steps {sorted(steps)}"
        )
    return int(which)


def latest_step(workdir: str | os.PathLike) -> int | None:
    """The latest finished checkpoint step of `workdir` (None if none), read without
    building anything: Orbax lists the finished step directories."""
    directory = workdir_files.workdir_path(workdir) / "checkpoints"
    steps = ocp.utils.checkpoint_steps(directory) if directory.exists() else []
    return max(steps, default=None)


def restore_latest(
    manager: ocp.CheckpointManager, abstract_state: Any
) -> tuple[Any, dict[str, Any]] | None:
    """(state, progress) from the latest finished checkpoint, or None if there is none.

    `abstract_state` is a tree of `jax.ShapeDtypeStruct` carrying the target shardings, so
    arrays land directly where the current mesh wants them. A slim checkpoint's state holds
    the trained params only: `Setup.restore_latest` puts the frozen ones back.
    """
    step = manager.latest_step()
    if step is None:
        return None
    return restore(manager, step, abstract_state)


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written, or does not fit the run's config."""


def frozen_record(manager: ocp.CheckpointManager, step: int) -> dict[str, Any] | None:
    """The record of the frozen params a slim checkpoint at `step` lacks; None for a full
    checkpoint (every param saved, as before slim checkpoints existed)."""
    restored = manager.restore(step, args=ocp.args.Composite(**{PROGRESS: ocp.args.JsonRestore()}))
    return dict(restored[PROGRESS]).get(FROZEN)


def check_compatible(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_params: Any,
    frozen: dict[str, Any] | None = None,
) -> None:
    """Compare saved param paths and shapes with the config's model; name the first mismatch.
    `frozen`: the checkpoint's `frozen_record`, whose params count as saved."""
    saved = manager.item_metadata(step)[STATE]
    saved = getattr(saved, "tree", saved)
    saved_params = saved.get("params") if isinstance(saved, dict) else None
    if saved_params is None:
        return  # unknown layout: leave it to Orbax
    want = {
        tree_paths.path_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
    }
    have = {
        tree_paths.path_str(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(saved_params)[0]
    }
    for path, leaf in (frozen or {}).get("leaves", {}).items():
        have[path] = tuple(leaf["shape"])
    where = f"checkpoint step {step} in {manager.directory}"
    for path, shape in want.items():
        if path not in have:
            raise CheckpointError(
                f"{where} has no param {path!r} that the config's model has "
                f"(shape {shape}); is config.model the one that was trained?"
            )
        if have[path] != shape:
            raise CheckpointError(
                f"{where}: param {path!r} has shape {have[path]} in the "
                f"checkpoint but {shape} in the config's model"
            )
    extra = sorted(set(have) - set(want))
    if extra:
        raise CheckpointError(
            f"{where} has param {extra[0]!r} (shape {have[extra[0]]}) that the "
            "config's model lacks; is config.model the one that was trained?"
        )


def restore(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_state: Any,
    frozen: Mapping[str, jax.Array] | None = None,
) -> tuple[Any, dict[str, Any]]:
    """(state, progress) saved at `step`, after checking it fits the config's model.

    A slim checkpoint's params get its frozen ones from `frozen` ({path: array}, streamed
    by the caller); without it they are the params the checkpoint holds (the trained ones).
    """
    record = frozen_record(manager, step)
    check_compatible(manager, step, abstract_state.params, record)
    target = abstract_state
    if record is not None:
        target = abstract_state.replace(params=_without(abstract_state.params, record["leaves"]))
    args = ocp.args.Composite(
        **{
            STATE: ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)
            ),
            PROGRESS: ocp.args.JsonRestore(),
        }
    )
    try:
        restored = manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:
        # Orbax's message lists every mismatched leaf (hundreds of lines): keep its first.
        first = str(e).strip().split("\n", 1)[0].rstrip(":")
        raise CheckpointError(
            f"checkpoint step {step} in {manager.directory} does not match this config's "
            f"optimizer state (did optim.preset, optim.rules or the optimizer change since it "
            f"was saved? Use a new workdir for a new setting): {first}"
        ) from e
    state = restored[STATE]
    return state.replace(params=_with(state.params, record, frozen)), dict(restored[PROGRESS])


def restore_params(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_params: Any,
    frozen: Mapping[str, jax.Array] | None = None,
) -> Any:
    """Only the params saved at `step` (no optimizer state is read or allocated), restored
    into the shardings `abstract_params` carries; for eval, export and the final eval.
    A slim checkpoint's frozen params come from `frozen`, as in `restore`."""
    record = frozen_record(manager, step)
    check_compatible(manager, step, abstract_params, record)
    reader = ocp.CheckpointManager(
        manager.directory,
        item_handlers={STATE: ocp.PyTreeCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False),
    )
    if record is not None:
        abstract_params = _without(abstract_params, record["leaves"])
    item = {"params": abstract_params}
    args = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )
    try:
        params = reader.restore(step, args=ocp.args.Composite(**{STATE: args}))[STATE]["params"]
    finally:
        close(reader)
    return _with(params, record, frozen)


def _without(params: Any, paths: Collection[str]) -> dict[str, Any]:
    """`params` less the leaves at `paths` (and the subtrees left empty)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    return traverse_util.unflatten_dict(
        {path: leaf for path, leaf in flat.items() if path not in paths}, sep="/"
    )


def _with(params: Any, record: dict[str, Any] | None, frozen: Mapping[str, Any] | None) -> Any:
    """A slim checkpoint's restored `params` with its frozen ones put back (all of them)."""
    if record is None or frozen is None:
        return params
    absent = sorted(set(record["leaves"]) - set(frozen))
    if absent:
        raise CheckpointError(f"no value for the frozen params {absent[:4]} the checkpoint lacks")
    flat = traverse_util.flatten_dict(params, sep="/")
    flat.update({path: frozen[path] for path in record["leaves"]})
    return traverse_util.unflatten_dict(flat, sep="/")


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves with the given shardings attached."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
    )
