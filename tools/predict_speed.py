"""Rows/s of `predict` next to `eval` on the same split of a trained run, in one sitting.

  python tools/predict_speed.py --workdir=runs/sst2 [--split=validation] [--repeats=2]

Eval: load (read + tokenize) the split and run the jitted eval step over it. Predict: the
split's rows written to a temporary .csv (the run's text columns), then `predict.predict`
into a temporary output: read, tokenize, the jitted predict step, probabilities, write.
Both use one built model and restored checkpoint (outside the timings); each is run
`--repeats` times and the last (warm: compiled) run is reported.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from finetune_jax.cli import quiet_libraries  # noqa: E402
from finetune_jax.data.prediction_io import RowWriter  # noqa: E402
from finetune_jax.evaluation.prediction import Predictor  # noqa: E402
from finetune_jax.predict import write_predictions  # noqa: E402
from finetune_jax.training import builder, run_config  # noqa: E402

WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a trained text-classification run.")
SPLIT = flags.DEFINE_string("split", "validation", "Split to time both on.")
REPEATS = flags.DEFINE_integer("repeats", 2, "Runs of each; the last one is reported.")


def eval_rows_per_second(setup, params, split: str) -> tuple[int, float]:
    """(rows, seconds) of loading `split` and evaluating it."""
    start = time.perf_counter()
    data = setup.data.load(split)
    setup.evaluate(params, data)
    return len(data), time.perf_counter() - start


def write_rows(setup, split: str, path: str) -> None:
    """The split's texts as an unlabeled csv in the run's text columns."""
    examples = setup.data.examples(split)
    columns = setup.task.text_columns
    texts = [examples.text_a] + ([examples.text_b] if examples.text_b is not None else [])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*texts))


def main(argv: list[str]) -> None:
    del argv
    quiet_libraries()
    config = run_config.saved_config(WORKDIR.value)
    setup = builder.build(config)
    step, params = setup.restore_params(WORKDIR.value)
    with tempfile.TemporaryDirectory() as tmp:
        source, output = os.path.join(tmp, "rows.csv"), os.path.join(tmp, "out.csv")
        write_rows(setup, SPLIT.value, source)
        predictor = Predictor(setup, params, setup.task.label_names, source)
        for _ in range(REPEATS.value):
            rows, seconds = eval_rows_per_second(setup, params, SPLIT.value)
            writer = RowWriter(output, overwrite=True)
            summary = write_predictions(predictor, source, writer, config.train.batch_size)
    result = {
        "workdir": WORKDIR.value,
        "step": step,
        "split": SPLIT.value,
        "rows": rows,
        "batch_size": config.train.batch_size,
        "eval_rows_per_second": round(rows / seconds, 1),
        "predict_rows_per_second": summary["rows_per_second"],
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
