"""The training loop: build the run, resume or start, step, evaluate, checkpoint, summarise.

`python -m finetune_jax.train` calls `train`; tests, sweeps and benchmarks call it directly.
Rerunning on the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import sys
import time
from typing import Any

import jax
import ml_collections

from finetune_jax import host_memory
from finetune_jax.evaluation.metrics import metric_mode
from finetune_jax.training import (
    builder,
    checkpoints,
    faults,
    manifest,
    optim,
    rerun,
    run_status,
    workdir_files,
    workdir_lock,
)
from finetune_jax.training.early_stopping import EarlyStopping
from finetune_jax.training.run_log import (
    TrainLog,
    format_metrics,
    peak_memory,
    process_seconds,
    say,
)


def train(
    config: ml_collections.ConfigDict, workdir: str, until_step: int | None = None
) -> dict[str, Any]:
    """Train (or resume) until `config.train.max_steps` (or `until_step`); returns a summary.

    A finished run is not trained again: its summary is printed and returned as it is.
    One training run per workdir: another one holding it is refused (`workdir_lock.py`).
    """
    _check_final_split(config)
    created = not workdir_files.workdir_path(workdir).exists()
    workdir_files.ensure_writable(workdir)
    try:
        with workdir_lock.hold(workdir) as lock:
            return _train(config, workdir, until_step, lock)
    except BaseException:
        if created:  # a failed first start leaves no empty workdir behind either
            with contextlib.suppress(OSError):
                os.rmdir(workdir)
        raise


def _train(config, workdir: str, until_step: int | None, lock) -> dict[str, Any]:
    """`train` once the workdir is this run's."""
    t_run = time.perf_counter()
    end = min(config.train.max_steps, until_step or config.train.max_steps)
    finished = rerun.check_workdir(config, workdir, end)  # before anything is built
    if finished is not None:
        return finished
    # Class names saved by a start that never reached a checkpoint are not the run's: the
    # data (perhaps fixed since) names them afresh.
    resumes = checkpoints.latest_step(workdir) is not None
    setup = builder.build(config, workdir=workdir if resumes else None)
    say(
        f"parameter groups (optim.preset={config.optim.preset!r}):\n"
        + optim.group_table(setup.groups, setup.abstract_params)
    )
    batches = setup.data.train_batches()
    # Every split the run evaluates is read now, before weights load and steps compile.
    eval_data = setup.data.load(config.data.eval_split)
    final_data = setup.data.load(config.train.final_split) if config.train.final_split else None
    host_memory.release_freed()  # what tokenizing left behind, before weights and state arrive
    manager = checkpoints.make_manager(
        workdir,
        config.train.keep_checkpoints,
        setup.metric,
        metric_mode(setup.metric),
        config.train.async_checkpoint,
    )
    state, stopper, window, checked = _resume_or_init(setup, manager, batches, workdir)
    frozen = setup.frozen_record(state.params, checked)  # what slim checkpoints record of the base
    # Written only now that the config, data and weights have passed: a failed start
    # (a frozen base that changed since the checkpoint, too) changes nothing.
    workdir_files.write_config(config, workdir)
    _save_label_names(setup.task, workdir)
    manifest.write_manifest(config, workdir, setup.mesh, frozen_base=frozen)
    start = int(state.step)
    check = faults.nonfinite_check(setup.trainable_paths, config.train.nonfinite)
    run = _Run(setup, manager, batches, eval_data, stopper, frozen)
    run.log = TrainLog(
        workdir, start, end, config.train.log_every, config.train.progress, check, window
    )
    guard = faults.PreemptionGuard(on_abort=lock.release if lock is not None else None)
    t_wall, final = time.perf_counter(), None
    try:
        state, stopped_by = _steps(run, state, start, end, guard)
        if config.train.final_split and stopped_by in (None, "early stopping"):
            run.log.flush()
            final = _final_eval(run, state, config.train.final_split, final_data)
            run.log.record(int(state.step), "final", final)
    finally:
        try:
            checkpoints.wait(manager)  # earlier saves complete even when a step failed
        finally:
            checkpoints.close(manager)
            run.log.close()
            guard.close()  # only now: a Ctrl-C while the saves finish is answered too
    summary = _summary(setup, state, stopper, run.log, time.perf_counter() - t_wall)
    summary["run_time_s"] = time.perf_counter() - t_run
    summary["process_time_s"] = process_seconds()
    summary["stopped_by"] = stopped_by
    summary["finished"] = run_status.is_finished(stopped_by, int(state.step), config)
    summary["first_step_s"] = run.first_step_s
    if final is not None:
        summary["final"] = final
    if jax.process_index() == 0:
        path = workdir_files.workdir_path(workdir)
        workdir_files.write_text_atomic(
            path / rerun.SUMMARY, workdir_files.json_text(summary, indent=2)
        )
        say(_outputs(path, manager.all_steps()))
    return summary


def _outputs(path, steps) -> str:
    """Where the run wrote what it wrote."""
    return (
        f"outputs in {path}:\n  summary.json, metrics.jsonl, config.json, manifest.json\n"
        f"  checkpoints/ (steps {sorted(steps)})\n"
        f"  tensorboard/ ({tensorboard_hint(path / 'tensorboard')})\n"
        f"  learning curves: python -m finetune_jax.plot --workdir={path}"
    )


def tensorboard_hint(logdir) -> str:
    """How to open `logdir` in TensorBoard here, or how to install it (an optional extra)."""
    if shutil.which("tensorboard"):
        return f"open: tensorboard --logdir {logdir}"
    if importlib.util.find_spec("tensorboard") is not None:  # installed, not on PATH
        return f"open: {sys.executable} -m tensorboard.main --logdir {logdir}"
    return f"to view: pip install -e '.[tensorboard]', then tensorboard --logdir {logdir}"


def _save_label_names(task, workdir: str) -> None:
    """A classifier's id -> class name mapping, printed and kept with the run."""
    names = task.label_names
    if names is None:  # regression, language models, speech
        return
    path = workdir_files.write_label_names(workdir, names)
    say("class ids: " + ", ".join(f"{i}={name}" for i, name in enumerate(names)) + f" ({path})")


@dataclasses.dataclass
class _Run:
    """What the step loop reads and updates besides the state."""

    setup: builder.Setup
    manager: Any
    batches: Any
    eval_data: Any
    stopper: EarlyStopping
    # The record of the frozen params that slim checkpoints leave out; None: full ones.
    frozen: dict[str, Any] | None
    log: TrainLog | None = None
    first_step_s: float | None = None


def _steps(run: _Run, state, start: int, end: int, guard) -> tuple[Any, str | None]:
    """Steps `start + 1 ... end` with evals and checkpoints; (state, what stopped it early).

    `train.max_steps=0` trains nothing: the initial (pretrained) model is evaluated and
    saved as step 0, so a zero-shot baseline is a run like any other (summary, final eval).
    """
    setup, train_cfg, log, stopper = run.setup, run.setup.config.train, run.log, run.stopper
    if end == 0:
        _save(run, state, _evaluate(run, state, 0))
        return state, None
    for step in range(start + 1, end + 1):
        state, metrics = setup.train_step(state, setup.put_batch(next(run.batches)))
        if step == start + 1:  # how long a (re)start takes: imports, data, weights, compile
            run.first_step_s = process_seconds(jax.block_until_ready(metrics))
        log.step(step, metrics)
        results = None
        if _every(step, train_cfg.eval_every) or step == end:
            results = _evaluate(run, state, step)
        preempted = guard.should_stop(_every(step, train_cfg.log_every) or step == end)
        if results or _every(step, train_cfg.checkpoint_every) or stopper.should_stop or preempted:
            _save(run, state, results)
        if preempted:
            checkpoints.wait(run.manager)
            log.message(
                f"{guard.received}: stopped after step {step}, checkpoint saved; "
                "rerun the same command to resume"
            )
            return state, guard.received
        if stopper.should_stop:
            log.message(
                f"early stopping at step {step}: no gain in {setup.metric} for "
                f"{stopper.patience} evals (best {stopper.best:.4f} at {stopper.best_step})"
            )
            return state, "early stopping"
    return state, None


def _every(step: int, interval: int) -> bool:
    """Whether `step` is a multiple of `interval` (0: never; the run's last step is handled
    by the callers)."""
    return interval > 0 and step % interval == 0


def _evaluate(run: _Run, state, step: int) -> dict[str, Any]:
    """Evaluates on data.eval_split, updates early stopping and logs; the metrics."""
    setup = run.setup
    run.log.flush()
    results = setup.evaluate(state.params, run.eval_data)
    improved = run.stopper.update(results[setup.metric], step)
    run.log.eval(step, results, run.stopper.best, improved)
    return results


def _save(run: _Run, state, results: dict[str, Any] | None) -> None:
    """Checkpoints `state` with the data position and early-stopping record."""
    run.log.fetch()  # sees every step's metrics (non-finite check) before saving
    run.log.sync()  # and a resume from this checkpoint finds them in the workdir
    progress = {
        "data": run.batches.state(),
        "early_stopping": run.stopper.to_dict(),
        "log_window": run.log.window_state(),  # a resume logs what an unbroken run logs
    }
    checkpoints.save(run.manager, state, progress, metrics=results, frozen=run.frozen)
    run.log.restart_timer()


def _check_final_split(config: ml_collections.ConfigDict) -> None:
    if config.train.final_split and config.train.final_split == config.data.eval_split:
        raise ValueError(
            f"train.final_split={config.train.final_split!r} is also data.eval_split, the "
            "split the best checkpoint is selected on: its final numbers would be optimistic. "
            "Select on a holdout (data.eval_split='holdout', data.holdout_rows=N) or set "
            "train.final_split=''"
        )


def _resume_or_init(setup, manager, batches, workdir) -> tuple[Any, EarlyStopping, Any, Any]:
    """The latest checkpoint's state (moving the data iterator to its position), its early
    stopping, its open log window and the record of the frozen params a slim one was
    checked against; or a new state (and None for the last two)."""
    stopper, window, checked = EarlyStopping(setup.metric, setup.config.train.patience), None, None
    restored = setup.restore_latest(manager)  # a slim one's frozen params streamed again
    if restored is None:
        state = setup.initial_state()
    else:
        state, progress = restored
        selected_on = progress["early_stopping"].get("metric")
        if selected_on != setup.metric:
            raise ValueError(
                f"{workdir} was trained selecting checkpoints on {selected_on!r}, but "
                f"train.metric now selects on {setup.metric!r}; its best checkpoint and early "
                "stopping would mix the two. Use a new workdir, or restore train.metric"
            )
        batches.restore(progress["data"])
        window = progress.get("log_window")  # absent from checkpoints of older runs
        checked = progress.get(checkpoints.FROZEN)  # a slim checkpoint's, checked on restore
        stopper = EarlyStopping.from_dict(
            {**progress["early_stopping"], "patience": setup.config.train.patience}
        )
        say(f"resumed from step {int(state.step)} in {workdir}")
    rounding = optim.rounding_mode(setup.config)
    say(
        f"optimizer state: {optim.tree_bytes(state.opt_state):,} bytes; mesh {dict(setup.mesh.shape)}"
        + ("" if rounding == "nearest" else f"; bf16 updates: {rounding} rounding")
    )
    return state, stopper, window, checked


def _final_eval(run: _Run, state, split: str, data) -> dict[str, Any]:
    """The best checkpoint's metrics on `split` (e.g. dev, after selecting on a holdout)."""
    setup, manager = run.setup, run.manager
    checkpoints.wait(manager)
    # The run's best step (first of equal scores), as the summary reports it; the manager's
    # own pick only if that checkpoint is gone.
    step = run.stopper.best_step
    if step not in manager.all_steps():
        step = checkpoints.pick_step(manager, "best")
    params = state.params
    if step != int(state.step):
        params = setup.checkpoint_params(manager, step, state.params, run.frozen)
    results = setup.evaluate(params, data)
    say(f"final eval of step {step} on {split}: " + format_metrics(results))
    return {"split": split, "step": step, **results}


def _summary(setup, state, stopper, log, wall_time) -> dict[str, Any]:
    seconds_per_step = log.steady_seconds_per_step()
    return {
        "final_step": int(state.step),
        # The step loop's seconds (compilation, steps, evals, checkpoints); run_time_s adds
        # what came before it (data preparation, weights), process_time_s also the imports.
        "loop_time_s": wall_time,
        "steady_seconds_per_step": seconds_per_step,
        "samples_per_s": setup.config.train.batch_size / seconds_per_step,
        "compiled_train_shapes": setup.train_step._cache_size(),
        "metric": setup.metric,
        "best": stopper.best,
        "best_step": stopper.best_step,
        # max_steps=0 (zero-shot) trains nothing, whatever the optimizer groups say.
        "trainable_params": optim.param_counts(setup.groups, setup.abstract_params)[0]
        if setup.config.train.max_steps
        else 0,
        "optimizer_state_bytes": optim.tree_bytes(state.opt_state),
        **peak_memory(),
    }
