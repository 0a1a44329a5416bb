"""Watch a deployed model for drift:
`python -m finetune_jax.monitor --workdir=... --input=NEW_DATA --out=DIR [--reference=...]`.

Compares new rows (`--input`, any file `predict` reads) with the data the model was validated
on (`--reference`: a file, or a split name; default the run's data.eval_split): input length
and unknown-token rate, the predicted-label distribution (PSI, KL), confidence, the pooled
features the classifier head reads (MMD two-sample test, permutation p-value) and, when the
rows have labels, accuracy (see `evaluation/drift_checks.py`, `evaluation/drift_statistics.py`). Writes
DIR/report.md (table + PNG plots) and DIR/drift.json. Exit status: 0 no drift, 1 drift over
the thresholds (for a cron job to alert on), 2 an error.
"""

from __future__ import annotations

import json
import os
import sys

import jax
from absl import app, flags

from finetune_jax.cli import define_run_config_flag, quiet_libraries, resolve_run_config, run_main
from finetune_jax.data import prediction_io
from finetune_jax.evaluation import drift_checks, drift_report
from finetune_jax.training import builder


def reference_chunks(setup, reference: str, rows: int):
    """Chunks of the reference rows: a file (or image folder), or a split of the run's data."""
    if os.path.exists(reference) or os.path.splitext(reference)[1]:
        return prediction_io.read_chunks(reference, rows, setup.task)
    return setup.kind.monitor_reference(setup, reference, rows)


def monitor(
    config,
    workdir: str,
    input_path: str,
    out_dir: str,
    reference: str = "",
    which: str = "best",
    thresholds: drift_checks.Thresholds | None = None,
    permutations=500,
    max_rows=1000,
) -> dict:
    """Writes the drift report of `input_path` against `reference`; returns drift.json's dict."""
    prediction_io.check_input(input_path)
    thresholds = thresholds or drift_checks.Thresholds()
    reference = reference or config.data.eval_split
    setup = builder.build(config, workdir=workdir)  # the class names the run trained with
    setup.kind.check_monitorable(setup)
    step, params = setup.restore_params(workdir, which)
    names = setup.task.label_names
    rows, seed = config.train.batch_size, config.seed
    ref = drift_checks.collect(
        setup, params, reference_chunks(setup, reference, rows), reference, names, max_rows, seed
    )
    chunks = prediction_io.read_chunks(input_path, rows, setup.task)
    new = drift_checks.collect(setup, params, chunks, input_path, names, max_rows, seed)
    checks, mmd = drift_checks.compare(ref, new, thresholds, permutations, max_rows, seed)
    meta = {"workdir": workdir, "step": step, "reference": reference, "input": input_path}
    result = drift_report.summary(checks, mmd, ref, new, meta)
    if jax.process_index() == 0:
        drift_report.write(out_dir, result, ref, new, names or ())
    return result


def main() -> None:
    config = define_run_config_flag()
    workdir = flags.DEFINE_string("workdir", None, "Workdir of the training run.")
    input_path = flags.DEFINE_string("input", None, "New rows (any file predict reads).")
    out = flags.DEFINE_string("out", None, "Directory for report.md, drift.json and plots.")
    reference = flags.DEFINE_string("reference", "", "File or split; '' = data.eval_split.")
    which = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
    defaults = drift_checks.Thresholds()
    psi = flags.DEFINE_float("psi", defaults.psi, "Drift when a PSI is above this.")
    kl = flags.DEFINE_float("kl", defaults.kl, "Drift when the predicted-label KL is above.")
    mmd_p = flags.DEFINE_float("mmd_p", defaults.mmd_p, "Drift when MMD's p-value is below.")
    unknown = flags.DEFINE_float("unknown_rate", defaults.unknown_rate, "Max unk-rate rise.")
    drop = flags.DEFINE_float("accuracy_drop", defaults.accuracy_drop, "Max accuracy drop.")
    permutations = flags.DEFINE_integer("permutations", 500, "MMD permutations (fixed seed).")
    max_rows = flags.DEFINE_integer("max_rows", 1000, "Rows per side in the MMD test.")
    flags.mark_flags_as_required(["workdir", "input", "out"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_libraries()
        limits = drift_checks.Thresholds(
            psi.value, kl.value, mmd_p.value, unknown.value, drop.value
        )
        paths = (workdir.value, input_path.value, out.value, reference.value)
        resolved = resolve_run_config(config, workdir.value)
        result = monitor(resolved, *paths, which.value, limits, permutations.value, max_rows.value)
        print(json.dumps({k: result[k] for k in ("drift", "rows", "checks")}, indent=2))
        print(f"report: {os.path.join(out.value, 'report.md')}", file=sys.stderr)
        sys.exit(1 if result["drift"] else 0)

    run_main(run)


if __name__ == "__main__":
    main()
