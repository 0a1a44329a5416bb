"""Predict on new, unlabeled rows:
`python -m finetune_jax.predict --workdir=... --input=FILE --output=FILE [--checkpoint=best]`.

Reads the run's own config from the workdir (`--config` and overrides stay possible and are
checked against it), restores a checkpoint and streams `--input` through the model in batches
of `--batch_size` rows (default train.batch_size). Input: .csv / .tsv / .jsonl / .parquet rows
with the run's text columns; for image runs a folder of images or a .txt / .csv / .jsonl list
of image paths; for causal LMs a .jsonl of `prompt` strings or chat `messages`; for translation
rows with the source column (`data.source_column`). Output (.csv or .jsonl): every input
column, then `label` and `prob_<label>` per class (multi-label: the labels over --threshold),
`score` (regression), `completion` (causal LM) or `translation`; segmentation writes a PNG of
class ids per image (and with --pictures the mask over the image) into --files_dir (default
`<output stem>_files/`) and names them in `mask` / `picture`; detection writes COCO-format
detections; an output column whose name an input column already has is written as
`predicted_<name>`. The output is
written to a temporary file and renamed at the end, and never replaces an existing file
unless --overwrite. A .csv / .tsv input is read by train's own reader: a row train would
reject (an unquoted comma, a byte that is not UTF-8, an empty text) stops predict with the
same message, naming its line.
"""

from __future__ import annotations

import json
import time

import jax
from absl import app, flags
from tqdm import tqdm

from finetune_jax.cli import define_run_config_flag, quiet_libraries, resolve_run_config, run_main
from finetune_jax.data import prediction_io
from finetune_jax.training import builder, run_status


def predict(
    config,
    workdir: str,
    input_path: str,
    output_path: str,
    which: str = "best",
    overwrite: bool = False,
    threshold: float = 0.5,
    files_dir: str = "",
    pictures: bool = False,
) -> dict:
    """Predicts every row of `input_path` into `output_path`; returns a summary. Kinds that
    write files per input (segmentation masks, pictures with `pictures`) put them in
    `files_dir` (default: beside the output, `<output stem>_files`)."""
    run_status.warn_if_unfinished(workdir)  # first: predictions of a half-trained run
    prediction_io.check_input(input_path)
    # Fails before the model loads; every process predicts (the batches are global), one writes.
    writer = prediction_io.RowWriter(output_path, overwrite, jax.process_index() == 0)
    setup = builder.build(config, workdir=workdir)  # the class names the run trained with
    step, params = setup.restore_params(workdir, which)
    files = prediction_io.FileOutputs(
        files_dir or prediction_io.default_files_dir(output_path), pictures, overwrite
    )
    predictor = setup.kind.predictor(setup, params, input_path, threshold, files)
    rows = config.train.batch_size
    return {"step": step, **write_predictions(predictor, input_path, writer, rows, setup.task)}


def write_predictions(predictor, input_path: str, writer, rows: int, task=None) -> dict:
    """Streams `input_path` through `predictor`, `rows` at a time, into `writer` (a csv / tsv
    read as train reads the run's `task`'s files: `prediction_io.read_chunks`)."""
    bar = tqdm(unit="row", dynamic_ncols=True, disable=jax.process_index() != 0)
    start = time.perf_counter()
    with writer:
        for chunk in prediction_io.read_chunks(input_path, rows, task):
            outputs = predictor(chunk)
            writer.write([prediction_io.merge(row, out) for row, out in zip(chunk, outputs)])
            bar.update(len(chunk))
    bar.close()
    seconds = time.perf_counter() - start
    return {
        "rows": writer.rows,
        "output": writer.path,
        "seconds": round(seconds, 3),
        "rows_per_second": round(writer.rows / max(seconds, 1e-9), 1),
    }


def main() -> None:
    config = define_run_config_flag()
    workdir = flags.DEFINE_string("workdir", None, "Workdir of the training run.")
    input_path = flags.DEFINE_string("input", None, "Rows to predict (see the docstring).")
    output = flags.DEFINE_string("output", None, "Where to write predictions (.csv / .jsonl).")
    which = flags.DEFINE_string("checkpoint", "best", "'best', 'latest' or a step number.")
    batch_size = flags.DEFINE_integer("batch_size", 0, "Rows per batch; 0 = train.batch_size.")
    threshold = flags.DEFINE_float("threshold", 0.5, "Multi-label: probability for a label.")
    files_dir = flags.DEFINE_string(
        "files_dir",
        "",
        "Segmentation / detection: folder of the files written per input "
        "(masks, pictures); '' = <output stem>_files.",
    )
    pictures = flags.DEFINE_bool(
        "pictures",
        False,
        "Segmentation / detection: also draw a picture per input (the "
        "mask over the image, the boxes on it) for a person to look at.",
    )
    overwrite = flags.DEFINE_bool("overwrite", False, "Replace an existing --output file.")
    flags.mark_flags_as_required(["workdir", "input", "output"])

    def run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        quiet_libraries()
        resolved = resolve_run_config(config, workdir.value)
        if batch_size.value:
            resolved.train.batch_size = batch_size.value
        paths = (workdir.value, input_path.value, output.value)
        summary = predict(
            resolved,
            *paths,
            which.value,
            overwrite.value,
            threshold.value,
            files_dir.value,
            pictures.value,
        )
        print(json.dumps(summary, indent=2))

    run_main(run)


if __name__ == "__main__":
    main()
