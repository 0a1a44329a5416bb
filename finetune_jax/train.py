"""Fine-tune a pretrained model: `python -m finetune_jax.train --config=... --workdir=...`.

Resumes automatically from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from finetune_jax import checkpoint, distributed, experiment, faults, manifest, optim
from finetune_jax import config as config_lib
from finetune_jax.cli import quiet_libraries, run_main
from finetune_jax.evaluation import EarlyStopping, evaluate, metric_mode
from finetune_jax.train_log import TrainLog, format_metrics, peak_memory, say


def train(
    config: ml_collections.ConfigDict, workdir: str, until_step: int | None = None
) -> dict[str, Any]:
    """Train (or resume) until `config.train.max_steps` (or `until_step`); returns a summary."""
    if config.train.final_split and config.train.final_split == config.data.eval_split:
        raise ValueError(
            f"train.final_split={config.train.final_split!r} is also data.eval_split, the "
            "split the best checkpoint is selected on: its final numbers would be optimistic. "
            "Select on a holdout (data.eval_split='holdout', data.holdout_rows=N) or set "
            "train.final_split=''"
        )
    config_lib.ensure_writable_workdir(workdir)
    exp = experiment.build(config)
    config_lib.write_config(config, workdir)
    manifest.write_manifest(config, workdir, exp.mesh)
    say(
        f"parameter groups (optim.preset={config.optim.preset!r}):\n"
        + optim.group_table(exp.groups, exp.params)
    )
    batches = experiment.train_batches(exp)
    eval_data = experiment.encode_split(exp, config.data.eval_split)
    manager = checkpoint.make_manager(
        workdir,
        config.train.keep_checkpoints,
        exp.metric,
        metric_mode(exp.metric),
        config.train.async_checkpoint,
    )
    state, stopper = _resume_or_init(exp, manager, batches, workdir)
    start, end = int(state.step), min(config.train.max_steps, until_step or config.train.max_steps)
    check = faults.nonfinite_check(exp.trainable_paths, config.train.nonfinite)
    log = TrainLog(workdir, start, end, config.train.log_every, config.train.progress, check)
    guard = faults.PreemptionGuard()
    t_wall, stopped_by = time.perf_counter(), None
    try:
        for step in range(start + 1, end + 1):
            state, metrics = exp.train_step(state, exp.put_batch(next(batches)))
            log.step(step, metrics)
            results = None
            if step % config.train.eval_every == 0 or step == end:
                log.flush()
                results = evaluate(
                    exp.eval_step,
                    state.params,
                    experiment.eval_batches(exp, eval_data),
                    exp.task,
                    exp.put_batch,
                )
                improved = stopper.update(results[exp.metric], step)
                log.eval(step, results, stopper.best, improved)
            preempted = guard.should_stop(step % config.train.log_every == 0 or step == end)
            if (
                results
                or step % config.train.checkpoint_every == 0
                or stopper.should_stop
                or preempted
            ):
                log.flush()  # sees every step's metrics (non-finite check) before saving
                progress = {"data": batches.state(), "early_stopping": stopper.to_dict()}
                checkpoint.save(manager, state, progress, metrics=results)
                log.restart_timer()
            if preempted:
                stopped_by = guard.received
                checkpoint.wait(manager)
                log.message(
                    f"{stopped_by}: stopped after step {step}, checkpoint saved; "
                    "rerun the same command to resume"
                )
                break
            if stopper.should_stop:
                stopped_by = "early stopping"
                log.message(
                    f"early stopping at step {step}: no gain in {exp.metric} for "
                    f"{stopper.patience} evals (best {stopper.best:.4f} at "
                    f"{stopper.best_step})"
                )
                break
        final = None
        if config.train.final_split and stopped_by in (None, "early stopping"):
            log.flush()
            final = _final_eval(exp, manager, state, stopper, config.train.final_split)
            log.record(int(state.step), "final", final)
    finally:
        guard.close()
        try:
            checkpoint.wait(manager)  # earlier saves complete even when a step failed
        finally:
            checkpoint.close(manager)
            log.close()
    summary = _summary(exp, state, stopper, log, time.perf_counter() - t_wall)
    summary["stopped_by"] = stopped_by
    if final is not None:
        summary["final"] = final
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    return summary


def _resume_or_init(exp, manager, batches, workdir) -> tuple[Any, EarlyStopping]:
    """The latest checkpoint's state (moving the data iterator to its position), or a new one."""
    stopper = EarlyStopping(exp.metric, exp.config.train.patience)
    restored = checkpoint.restore_latest(manager, exp.abstract_state())
    if restored is None:
        state = exp.initial_state()
    else:
        state, progress = restored
        selected_on = progress["early_stopping"].get("metric")
        if selected_on != exp.metric:
            raise ValueError(
                f"{workdir} was trained selecting checkpoints on {selected_on!r}, but "
                f"train.metric now selects on {exp.metric!r}; its best checkpoint and early "
                "stopping would mix the two. Use a new workdir, or restore train.metric"
            )
        batches.restore(progress["data"])
        stopper = EarlyStopping.from_dict(
            {**progress["early_stopping"], "patience": exp.config.train.patience}
        )
        say(f"resumed from step {int(state.step)} in {workdir}")
    say(
        f"optimizer state: {optim.tree_bytes(state.opt_state):,} bytes; mesh {dict(exp.mesh.shape)}"
    )
    return state, stopper


def _final_eval(exp, manager, state, stopper, split: str) -> dict[str, Any]:
    """The best checkpoint's metrics on `split` (e.g. dev, after selecting on a holdout)."""
    checkpoint.wait(manager)
    # The run's best step (first of equal scores), as the summary reports it; the manager's
    # own pick only if that checkpoint is gone.
    step = stopper.best_step
    if step not in manager.all_steps():
        step = checkpoint.pick_step(manager, "best")
    params = state.params
    if step != int(state.step):
        params = checkpoint.restore(manager, step, exp.abstract_state())[0].params
    data = experiment.encode_split(exp, split)
    batches = experiment.eval_batches(exp, data)
    results = evaluate(exp.eval_step, params, batches, exp.task, exp.put_batch)
    say(f"final eval of step {step} on {split}: " + format_metrics(results))
    return {"split": split, "step": step, **results}


def _summary(exp, state, stopper, log, wall_time) -> dict[str, Any]:
    seconds_per_step = log.steady_seconds_per_step()
    return {
        "final_step": int(state.step),
        "wall_time_s": wall_time,
        "steady_seconds_per_step": seconds_per_step,
        "samples_per_s": exp.config.train.batch_size / seconds_per_step,
        "compiled_train_shapes": exp.train_step._cache_size(),
        "metric": exp.metric,
        "best": stopper.best,
        "best_step": stopper.best_step,
        "trainable_params": optim.param_counts(exp.groups, exp.params)[0],
        "optimizer_state_bytes": optim.tree_bytes(state.opt_state),
        **peak_memory(),
    }


def main() -> None:
    # Flags are defined here, not at import, so tests can import `train` next to `eval`.
    config = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (configs/**.py)."
    )
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
    cluster = distributed.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_libraries()
        distributed.initialize_from_flags(cluster)
        summary = train(config.value, workdir.value)
        if jax.process_index() == 0:
            print(json.dumps(summary, indent=2))

    run_main(run)


if __name__ == "__main__":
    main()
