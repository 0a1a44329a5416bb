"""Rows in and out of `predict` / `monitor`: unlabeled rows streamed from a file in chunks,
predictions written to a temporary sibling and renamed at the end.

Inputs, by extension: `.csv`, `.tsv`, `.jsonl`, `.parquet` (rows with named columns), `.txt`
(one image path per line), or a directory (every image file in it, sorted). Outputs: `.csv` or
`.jsonl`. No input is ever read whole: `read_chunks` yields lists of at most `rows` dicts.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from finetune_jax.data.image_sources import ImageSplit
from finetune_jax.data.text_sources import DataError, Examples
from finetune_jax.json_values import json_text

INPUT_FORMATS = (".csv", ".tsv", ".jsonl", ".parquet", ".txt")
OUTPUT_FORMATS = (".csv", ".jsonl")
PATH_COLUMN = "path"  # image inputs: the column naming each image (or data.image_column)


def _extension(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def check_input(path: str) -> None:
    """Fail before any model loads when `path` is missing or of an unknown kind."""
    if os.path.isdir(path):
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input={path!r} does not exist")
    if _extension(path) not in INPUT_FORMATS:
        raise ValueError(
            f"--input={path!r}: unknown file kind {_extension(path)!r}; expected one of "
            f"{', '.join(INPUT_FORMATS)} or a directory of images"
        )


def read_chunks(path: str, rows: int) -> Iterator[list[dict[str, Any]]]:
    """The rows of `path` in file order, `rows` at a time (the last chunk may be shorter).

    A directory yields `{"path": <image file>}` per image; a `.txt` file one such row per
    non-empty line (relative paths are taken from the file's directory).
    """
    check_input(path)
    chunk: list[dict[str, Any]] = []
    for row in _rows(path):
        chunk.append(row)
        if len(chunk) == rows:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def example_chunks(
    examples: Examples, text_columns: Sequence[str], label_column: str, rows: int
) -> Iterator[list[dict[str, Any]]]:
    """A loaded split as chunks of rows, as `read_chunks` yields a file's: the text columns
    and the label (a class id, or a regression score)."""
    texts = [examples.text_a] + ([examples.text_b] if examples.text_b is not None else [])
    for start in range(0, len(examples), rows):
        stop = min(start + rows, len(examples))
        yield [
            {**{c: t[i] for c, t in zip(text_columns, texts)}, label_column: examples.labels[i]}
            for i in range(start, stop)
        ]


def _rows(path: str) -> Iterator[dict[str, Any]]:
    if os.path.isdir(path):
        extensions = Image.registered_extensions()
        for name in sorted(os.listdir(path)):
            if _extension(name) in extensions and not name.startswith("."):
                yield {PATH_COLUMN: os.path.join(path, name)}
        return
    kind = _extension(path)
    if kind == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415 (datasets' dependency; parquet only)

        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
        return
    with open(path, newline="" if kind in (".csv", ".tsv") else None, encoding="utf-8") as f:
        if kind in (".csv", ".tsv"):
            yield from csv.DictReader(f, delimiter="\t" if kind == ".tsv" else ",")
        elif kind == ".jsonl":
            for number, line in enumerate(f, 1):
                if line.strip():
                    yield _json_row(line, path, number)
        else:  # .txt: image paths
            for line in f:
                if line.strip():
                    yield {PATH_COLUMN: _beside(path, line.strip())}


def _json_row(line: str, path: str, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}, line {number}: not valid JSON ({e})") from e
    if not isinstance(row, dict):
        raise DataError(f"{path}, line {number}: expected a JSON object, got {row!r:.60}")
    return row


def _beside(list_file: str, image: str) -> str:
    return image if os.path.isabs(image) else os.path.join(os.path.dirname(list_file), image)


def _require(rows: Sequence[dict[str, Any]], columns: Sequence[str], source: str) -> None:
    missing = [c for c in columns if c not in rows[0]]
    if missing:
        raise DataError(
            f"{source}: no column(s) {missing} (the run's task reads {list(columns)}); "
            f"the file has {list(rows[0])}"
        )


def text_examples(
    rows: Sequence[dict[str, Any]], text_columns: Sequence[str], source: str
) -> Examples:
    """A chunk's texts as unlabeled `Examples` (labels 0) in the run's text columns."""
    _require(rows, text_columns, source)
    texts = [["" if row[c] is None else str(row[c]) for row in rows] for c in text_columns]
    return Examples(
        text_a=texts[0],
        text_b=texts[1] if len(texts) > 1 else None,
        labels=np.zeros(len(rows), np.int32),
        source=source,
    )


def image_split(rows: Sequence[dict[str, Any]], column: str, source: str) -> ImageSplit:
    """A chunk's images (column `path`, or `column`) as an unlabeled `ImageSplit`."""
    column = PATH_COLUMN if PATH_COLUMN in rows[0] else column
    _require(rows, [column], source)
    base = source if os.path.isfile(source) else os.path.join(source, "x")
    paths = [_beside(base, str(row[column])) for row in rows]
    return ImageSplit(
        labels=np.zeros(len(rows), np.int32),
        read=lambda i: Image.open(paths[i]),
        locate=lambda i: f"{source}: image {paths[i]}",
        source=source,
    )


def merge(row: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """The input row's columns, then the outputs; an output whose name the input already
    uses becomes `predicted_<name>` (the user's column is never overwritten)."""
    return row | {(f"predicted_{k}" if k in row else k): v for k, v in outputs.items()}


class RowWriter:
    """Writes output rows (`.csv` or `.jsonl`) to a temporary sibling of `path`, renamed to
    `path` by `commit`; an error (exiting the `with` block by an exception) removes it, so a
    failed run never leaves a half file that looks complete. An existing `path` is an error
    unless `overwrite`. `enabled=False` (processes other than 0) only counts rows."""

    def __init__(self, path: str, overwrite: bool = False, enabled: bool = True):
        self.path, self.rows, self.enabled = path, 0, enabled
        if not enabled:
            return
        if _extension(path) not in OUTPUT_FORMATS:
            raise ValueError(f"--output={path!r}: write a .csv or .jsonl file")
        if os.path.exists(path) and not overwrite:
            raise FileExistsError(f"--output={path!r} exists; choose another or pass --overwrite")
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise FileNotFoundError(f"--output={path!r}: its directory does not exist")
        self._tmp = f"{path}.tmp-{os.getpid()}"
        self._file: io.TextIOBase | None = None
        self._csv: csv.DictWriter | None = None

    def __enter__(self) -> RowWriter:
        if not self.enabled:
            return self
        self._file = open(self._tmp, "w", newline="", encoding="utf-8")  # noqa: SIM115
        return self

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        """Append `rows` (the first row's keys are the csv header)."""
        self.rows += len(rows)
        if not self.enabled:
            return
        assert self._file is not None, "use RowWriter in a with block"
        if _extension(self.path) == ".jsonl":
            # NaN (a diverged model's probabilities) as null: the file stays valid JSON lines.
            self._file.writelines(
                json_text({k: _plain(v) for k, v in row.items()}) + "\n" for row in rows
            )
        else:
            if self._csv is None and rows:
                self._csv = csv.DictWriter(self._file, fieldnames=list(rows[0]))
                self._csv.writeheader()
            self._csv.writerows({k: _cell(v) for k, v in row.items()} for row in rows)

    def __exit__(self, kind, value, traceback) -> None:
        if not self.enabled:
            return
        self._file.close()
        if kind is None:
            os.replace(self._tmp, self.path)
        else:
            os.remove(self._tmp)


def _plain(value: Any) -> Any:
    """numpy scalars / arrays and dates (from parquet) as JSON values; JSON values as they are."""
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if value is None or isinstance(value, str | int | float | bool | list | dict):
        return value
    return str(value)


def _cell(value: Any) -> Any:
    """A csv cell: a list of labels (multi-label) joined by '|'."""
    return "|".join(map(str, value)) if isinstance(value, list | tuple) else value
