"""Evaluate a trained run: `python -m finetune_jax.eval --workdir=... [--config=...] --split=validation`.

Restores the best checkpoint (by the run's metric), the latest, a given step or the untuned
pretrained model (`--checkpoint=pretrained`), evaluates on the requested split and writes
`<workdir>/eval_<split>_step<step>.json`, and the per-example records the task's kind adds as
`<records>_<split>_step<step>.jsonl`: causal LMs report perplexity and write sample
generations (`generations_...`, with GSM8K exact match); speech tasks WER / CER and every
transcript next to its reference (`transcripts_...`); NER the entities of each sentence
(`entities_...`); translation chrF / BLEU (with sacrebleu's signatures) and every translation
beside its source and reference (`translations_...`).
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import ml_collections
from absl import app, flags

from finetune_jax.cli import define_run_config_flag, quiet_libraries, resolve_run_config, run_main
from finetune_jax.cluster import distributed
from finetune_jax.config import did_you_mean
from finetune_jax.data import selection, text_tasks
from finetune_jax.training import builder, run_status, workdir_files


def run_eval(
    config: ml_collections.ConfigDict, workdir: str, split: str, which: str = "best"
) -> dict[str, Any]:
    """Evaluate one checkpoint of `workdir` on `split`; returns and writes the metrics.

    `which`: "best", "latest", a step number, or "pretrained" (the untuned model, no
    checkpoint needed: the baseline a fine-tune is compared against). For causal-LM tasks
    also writes `generations_<split>_<which>.jsonl` (prompt, reference, output) for the first
    `generate.num_samples` records, and reports their exact match where the task scores one.
    """
    if which != "pretrained":
        run_status.warn_if_unfinished(workdir)  # first: `train && eval` of a preempted run
    setup = builder.build(config, workdir=workdir)
    if which == "pretrained":
        workdir_files.ensure_writable(workdir)
        step, params = 0, setup.pretrained_params()
    else:
        step, params = setup.restore_params(workdir, which)
    data = setup.data.load(split)
    records: list[dict[str, Any]] = []  # per example, from the task's scorer and samples
    results = setup.evaluate(params, data, records)
    tag = "pretrained" if which == "pretrained" else f"step{step}"
    results = {"split": split, "step": step, "task": setup.task.name, **results}
    if which == "best":
        results["selected_on"] = config.data.eval_split
        if split == config.data.eval_split and jax.process_index() == 0:
            print(
                f"note: the best checkpoint was selected on {split!r}; numbers on the split "
                "a choice was made on are optimistic (report a split nothing was chosen on)",
                file=sys.stderr,
            )
    samples, summary = setup.kind.eval_samples(setup, params, data)
    records += samples
    results.update(summary)
    if jax.process_index() == 0:
        path = workdir_files.workdir_path(workdir)
        workdir_files.write_text_atomic(
            path / f"eval_{split}_{tag}.json", workdir_files.json_text(results, indent=2)
        )
        if records:  # generations, transcripts or entities, one per example
            lines = "".join(workdir_files.json_text(r) + "\n" for r in records)
            name = f"{setup.kind.eval_records}_{split}_{tag}.jsonl"
            workdir_files.write_text_atomic(path / name, lines)
    return results


def main() -> None:
    config = define_run_config_flag()
    workdir = flags.DEFINE_string("workdir", None, "Workdir of the training run.")
    split = flags.DEFINE_string(
        "split", "validation", "Split to evaluate (validation, test, train, holdout)."
    )
    flags.register_validator("split", _known_split)
    which = flags.DEFINE_string(
        "checkpoint", "best", "'best', 'latest', a step number, or 'pretrained' (untuned)."
    )
    cluster = distributed.define_flags()
    flags.mark_flags_as_required(["workdir"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_libraries()
        distributed.initialize_from_flags(cluster)
        results = run_eval(
            resolve_run_config(config, workdir.value), workdir.value, split.value, which.value
        )
        if jax.process_index() == 0:
            print(workdir_files.json_text(results, indent=2))

    run_main(run)


def _known_split(split: str) -> bool:
    """`--split` is a split name every kind knows; else an error suggesting the closest."""
    known = (*text_tasks.SPLITS, selection.HOLDOUT)
    if split not in known:
        hint = did_you_mean(split, known)
        raise flags.ValidationError(
            f"unknown split {split!r}; {hint + ' ' if hint else ''}(splits: {', '.join(known)})"
        )
    return True


if __name__ == "__main__":
    main()
