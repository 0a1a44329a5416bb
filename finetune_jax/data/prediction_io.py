"""Rows in and out of `predict` / `monitor`: unlabeled rows streamed from a file in chunks,
predictions written to a temporary sibling and renamed at the end.

Inputs, by extension: `.csv`, `.tsv`, `.jsonl`, `.parquet` (rows with named columns), `.txt`
(one image path per line), or a directory (every image file in it, sorted). A `.csv` / `.tsv`
is read by train's own reader (`row_files.delimited_rows`: a header line, cells quoted with
`"`), so a row train would reject with its line is rejected here the same way. Outputs: `.csv`
or `.jsonl`. No input is ever read whole: `read_chunks` yields lists of at most `rows` dicts.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from finetune_jax.data import row_files
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


@dataclasses.dataclass(frozen=True)
class FileOutputs:
    """Where predict's per-input files go (segmentation masks, pictures) and what is drawn.

    Attributes:
      directory: the folder the files are written to (made when the first one is).
      pictures: also draw a picture per input for a person to look at (the mask over the
        image, the boxes on it).
      overwrite: replace files already there (else an existing file is an error).
    """

    directory: str
    pictures: bool = False
    overwrite: bool = False

    def path(self, name: str) -> str:
        """Where file `name` goes; the folder is made, an existing file refused unless
        `overwrite`."""
        os.makedirs(self.directory, exist_ok=True)
        path = os.path.join(self.directory, name)
        if os.path.exists(path) and not self.overwrite:
            raise FileExistsError(
                f"{path!r} exists (--files_dir={self.directory!r}); choose another "
                "--files_dir or pass --overwrite"
            )
        return path


def default_files_dir(output_path: str) -> str:
    """The per-input files' folder beside `--output`: `preds.jsonl` -> `preds_files`."""
    return os.path.splitext(output_path)[0] + "_files"


class Rows(list):
    """A chunk of input rows (dicts), and where each one is in its file, for errors."""

    def __init__(self, source: str, word: str):
        super().__init__()
        self.source, self.word, self.numbers = source, word, []

    def where(self, i: int) -> str:
        """Row i's place, e.g. "'new.csv' line 4"."""
        return f"{self.source!r} {self.word} {self.numbers[i]}"


def read_chunks(path: str, rows: int, task: Any = None) -> Iterator[Rows]:
    """The rows of `path` in file order, `rows` at a time (the last chunk may be shorter).

    A directory yields `{"path": <image file>}` per image; a `.txt` file one such row per
    non-empty line (relative paths are taken from the file's directory). `task`, the run's:
    a `.tsv` of a task that reads its own TSV files without quoting (GLUE's, which hold
    unbalanced `"`) is read so too, as train would read it.
    """
    check_input(path)
    quote_none = task is not None and task.quote_none and _extension(path) == ".tsv"
    word = "row" if os.path.isdir(path) or _extension(path) == ".parquet" else "line"
    chunk = Rows(path, word)
    for number, row in _rows(path, quote_none):
        chunk.append(row)
        chunk.numbers.append(number)
        if len(chunk) == rows:
            yield chunk
            chunk = Rows(path, word)
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


def _rows(path: str, quote_none: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line, or 1-based row of a parquet file or directory, row) in file order."""
    if os.path.isdir(path):
        extensions = Image.registered_extensions()
        names = [n for n in sorted(os.listdir(path)) if _extension(n) in extensions]
        names = [n for n in names if not n.startswith(".")]
        for number, name in enumerate(names, 1):
            yield number, {PATH_COLUMN: os.path.join(path, name)}
        return
    extension = _extension(path)
    if extension == ".parquet":
        import pyarrow.parquet as pq  # noqa: PLC0415 (datasets' dependency; parquet only)

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield number, row
    elif extension in (".csv", ".tsv"):
        yield from row_files.delimited_rows(path, "\t" if extension == ".tsv" else ",", quote_none)
    elif extension == ".jsonl":
        yield from row_files.json_rows(path)
    else:  # .txt: image paths
        with open(path, encoding="utf-8") as f:
            try:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        yield number, {PATH_COLUMN: _beside(path, line.strip())}
            except UnicodeDecodeError as e:
                raise row_files.undecodable(path, e) from None


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
    """A chunk's texts as unlabeled `Examples` (labels 0) in the run's text columns.

    An empty (or missing) text is an error naming its line, as in train: a prediction for
    no text would look like an answer and say nothing.
    """
    _require(rows, text_columns, source)
    texts = [["" if row[c] is None else str(row[c]) for row in rows] for c in text_columns]
    for column, values in zip(text_columns, texts):
        empty = [i for i, text in enumerate(values) if not text.strip()]
        if empty:
            where = (
                rows.where(empty[0]) if isinstance(rows, Rows) else f"{source} row {empty[0] + 1}"
            )
            raise DataError(
                f"{where}: column {column!r} is empty; fill or remove the row (predict needs a "
                "text in every row)"
            )
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
        try:
            self._file = open(self._tmp, "w", newline="", encoding="utf-8")  # noqa: SIM115
        except OSError as e:  # a read-only or full file system, no permission
            folder = os.path.dirname(os.path.abspath(self.path))
            raise OSError(
                e.errno, f"--output={self.path!r}: cannot write in {folder!r} ({e.strerror})"
            ) from None
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
