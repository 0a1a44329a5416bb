"""Fine-tune a pretrained model: `python -m finetune_jax.train --config=... --workdir=...`.

Resumes automatically from the latest checkpoint in the workdir.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from finetune_jax import checkpoint, experiment, optim
from finetune_jax import config as config_lib
from finetune_jax.cli import quiet_libraries, run_main
from finetune_jax.evaluation import EarlyStopping, evaluate, metric_mode
from finetune_jax.metric_writers import MetricWriter
from finetune_jax.progress import Progress



def train(config: ml_collections.ConfigDict, workdir: str, until_step: int | None = None
          ) -> dict[str, Any]:
  """Train (or resume) until `config.train.max_steps` (or `until_step`); returns a summary."""
  exp = experiment.build(config)
  config_lib.write_config(config, workdir)
  say(f"parameter groups (optim.preset={config.optim.preset!r}):\n"
      + optim.group_table(exp.groups, exp.params))
  batches = experiment.train_batches(exp)
  eval_data = experiment.encode_split(exp, config.data.eval_split)
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints, exp.metric,
                                    metric_mode(exp.metric), config.train.async_checkpoint)
  stopper = EarlyStopping(exp.metric, config.train.patience)
  restored = checkpoint.restore_latest(manager, exp.abstract_state())
  if restored is None:
    state = exp.initial_state()
  else:
    state, progress = restored
    batches.restore(progress["data"])
    stopper = EarlyStopping.from_dict(progress["early_stopping"])
    say(f"resumed from step {int(state.step)} in {workdir}")
  say(f"optimizer state: {optim.tree_bytes(state.opt_state):,} bytes; mesh {dict(exp.mesh.shape)}")

  writer = MetricWriter(workdir)
  start, end = int(state.step), min(config.train.max_steps, until_step or config.train.max_steps)
  progress_bar = Progress(start, end, enabled=config.train.progress)
  pending, intervals, t0, t_wall = [], [], time.perf_counter(), time.perf_counter()
  saved_step, train_step_time = None, 0.0
  for step in range(start + 1, end + 1):
    state, metrics = exp.train_step(state, exp.put_batch(next(batches)))
    pending.append(metrics)  # fetched at log time: dispatch stays asynchronous
    if step % config.train.log_every == 0 or step == end:
      means = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
      intervals.append(((time.perf_counter() - t0) / len(pending), step))
      means["seconds_per_step"] = intervals[-1][0]
      writer.write(step, "train", means)
      progress_bar.update(step, means)
      pending, t0 = [], time.perf_counter()
    is_eval = step % config.train.eval_every == 0 or step == end
    if is_eval:
      results = evaluate(exp.eval_step, state.params, experiment.eval_batches(exp, eval_data),
                         exp.task, exp.put_batch)
      improved = stopper.update(results[exp.metric], step)
      writer.write(step, "eval", {**results, "best": stopper.best})
      progress_bar.log(f"step {step}: eval " + " ".join(f"{k}={v:.4f}" for k, v in results.items())
                       + (" (best)" if improved else ""))
    if is_eval or step % config.train.checkpoint_every == 0 or stopper.should_stop:
      progress = {"data": batches.state(), "early_stopping": stopper.to_dict()}
      checkpoint.save(manager, state, progress, metrics=results if is_eval else None)
      saved_step = step
    if is_eval or step == saved_step:
      t0 = time.perf_counter()  # keep eval and checkpoint time out of step timings
    if stopper.should_stop:
      progress_bar.log(f"early stopping at step {step}: no gain in {exp.metric} for "
                       f"{stopper.patience} evals (best {stopper.best:.4f} at {stopper.best_step})")
      break
  manager.wait_until_finished()
  progress_bar.close()
  writer.close()
  summary = _summary(exp, state, stopper, intervals, time.perf_counter() - t_wall)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
  return summary


def say(message: str) -> None:
  """Print on process 0 only (the other processes run the same code silently)."""
  if jax.process_index() == 0:
    print(message, flush=True)


def _summary(exp, state, stopper, intervals, wall_time) -> dict[str, Any]:
  # The first interval includes compilation; steady state is the median of the rest.
  steady = [s for s, _ in intervals[1:]] or [s for s, _ in intervals]
  seconds_per_step = statistics.median(steady) if steady else float("nan")
  return {
      "final_step": int(state.step), "wall_time_s": wall_time,
      "steady_seconds_per_step": seconds_per_step,
      "samples_per_s": exp.config.train.batch_size / seconds_per_step,
      "compiled_train_shapes": exp.train_step._cache_size(),
      "metric": exp.metric, "best": stopper.best, "best_step": stopper.best_step,
      "trainable_params": int(sum(np.prod(p.shape) for p, t in zip(
          jax.tree.leaves(exp.params), jax.tree.leaves(exp.groups.trainable)) if t)),
      "optimizer_state_bytes": optim.tree_bytes(state.opt_state),
  }


def main() -> None:
  # Flags are defined here, not at import, so tests can import `train` next to `eval`.
  config = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/**.py).")
  workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and metrics.")
  flags.mark_flags_as_required(["config", "workdir"])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    quiet_libraries()
    print(json.dumps(train(config.value, workdir.value), indent=2))

  run_main(run)


if __name__ == "__main__":
  main()
