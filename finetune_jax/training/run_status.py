"""Whether a workdir's training run finished, read from its files without building anything.

`train` records it in summary.json (`finished`); `eval`, `export` and `predict` of a run that
did not finish (stopped by a signal, crashed, still training, or trained on past its last
summary) say so on their first line, since a preempted run exits 0 and `train && export`
would otherwise export a half-trained model without a word.
"""

from __future__ import annotations

import os
import sys

import ml_collections

from finetune_jax.training import checkpoints, rerun, workdir_files, workdir_lock


def is_finished(stopped_by: str | None, final_step: int, config: ml_collections.ConfigDict) -> bool:
    """A run is finished when it stopped early by its own rule or reached train.max_steps
    (not when a signal stopped it, nor at a `train(..., until_step=...)` below it)."""
    return stopped_by == "early stopping" or (
        stopped_by is None and final_step >= config.train.max_steps
    )


def unfinished_note(workdir: str | os.PathLike) -> str | None:
    """One line saying that `workdir`'s run did not finish, and what reading it gives; None
    when it finished (or there is nothing to read: the reader's own error says so)."""
    latest = checkpoints.latest_step(workdir)
    holder = workdir_lock.read_holder(workdir)
    if holder is not None and workdir_lock.stale_reason(holder) is None:
        reads = "reading only its finished checkpoints"
        if latest is None:
            reads = "it has no finished checkpoint yet"
        return f"warning: {workdir} is still being trained ({holder.describe()}); {reads}"
    if latest is None:
        return None
    reads = f"reading its latest finished checkpoints (latest: step {latest})"
    path = workdir_files.workdir_path(workdir)
    summary = workdir_files.read_json(path / rerun.SUMMARY)
    again = "rerun the same train command to finish it"
    if summary is None:
        return (
            f"warning: the run in {workdir} did not finish (no summary.json: it crashed or was "
            f"killed); {reads}; {again}"
        )
    step, stopped_by = summary.get("final_step"), summary.get("stopped_by")
    if latest != step:
        return (
            f"warning: the run in {workdir} trained on past its summary (step {step}) to step "
            f"{latest} and did not finish (crashed or killed); {reads}; {again}"
        )
    max_steps = (rerun.previous_config(workdir) or {}).get("train", {}).get("max_steps")
    finished = summary.get("finished")
    if finished is None:  # a summary written before `finished` was recorded
        finished = stopped_by == "early stopping" or (
            stopped_by is None and (max_steps is None or step >= max_steps)
        )
    if finished:
        return None
    why = f"stopped by {stopped_by}" if stopped_by else "stopped"
    return (
        f"warning: the run in {workdir} did not finish ({why} at step {step} of {max_steps}); "
        f"{reads}; {again}"
    )


def warn_if_unfinished(workdir: str | os.PathLike) -> str | None:
    """Print `unfinished_note` (process 0, stderr, flushed: it comes first); returns it."""
    note = unfinished_note(workdir)
    if note is not None:
        import jax  # noqa: PLC0415

        # Asked without starting the backend, whose start-up warnings would come first.
        if not jax.distributed.is_initialized() or jax.process_index() == 0:
            print(note, file=sys.stderr, flush=True)
    return note
