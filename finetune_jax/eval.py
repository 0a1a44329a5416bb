"""Evaluate a trained run: `python -m finetune_jax.eval --config=... --workdir=... --split=validation`.

Restores the best checkpoint (by the run's metric) or the latest or a given step, evaluates
on the requested split and writes `<workdir>/eval_<split>_step<step>.json`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from finetune_jax import checkpoint, distributed, experiment
from finetune_jax.cli import quiet_libraries, run_main
from finetune_jax.evaluation import evaluate, metric_mode


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


def run_eval(
    config: ml_collections.ConfigDict, workdir: str, split: str, which: str = "best"
) -> dict[str, Any]:
    """Evaluate one checkpoint of `workdir` on `split`; returns and writes the metrics."""
    exp = experiment.build(config)
    metric = exp.metric
    manager = checkpoint.make_manager(
        workdir,
        config.train.keep_checkpoints,
        metric,
        metric_mode(metric),
        async_save=False,
        read_only=True,
    )
    step = pick_step(manager, which)
    state, _ = checkpoint.restore(manager, step, exp.abstract_state())
    encoded = experiment.encode_split(exp, split)
    results = evaluate(
        exp.eval_step, state.params, experiment.eval_batches(exp, encoded), exp.task, exp.put_batch
    )
    results = {"split": split, "step": step, "task": exp.task.name, **results}
    if jax.process_index() == 0:
        with open(os.path.join(workdir, f"eval_{split}_step{step}.json"), "w") as f:
            json.dump(results, f, indent=2)
    return results


def main() -> None:
    config = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (configs/**.py)."
    )
    workdir = flags.DEFINE_string("workdir", None, "Workdir of the training run.")
    split = flags.DEFINE_string(
        "split", "validation", "Split to evaluate (validation, test, train)."
    )
    which = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
    cluster = distributed.define_flags()
    flags.mark_flags_as_required(["config", "workdir"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_libraries()
        distributed.initialize_from_flags(cluster)
        results = run_eval(config.value, workdir.value, split.value, which.value)
        if jax.process_index() == 0:
            print(json.dumps(results, indent=2))

    run_main(run)


if __name__ == "__main__":
    main()
