"""Loading one split of a task, from local TSV files or the HF hub, into plain arrays.

Everything goes through HF `datasets` (its CSV builder for local files). Local files are
validated row by row, and every problem raises `DataError` naming the file, the line and
what to do, because a silently mis-parsed GLUE file still trains — just to a worse number.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
from collections.abc import Iterator

import datasets
import numpy as np

from finetune_jax.data.tasks import SPLITS, Task


class DataError(ValueError):
    """A data file or hub split is missing, malformed or holds an invalid label."""


@dataclasses.dataclass
class Examples:
    """One split as plain Python/numpy data, rows in file order.

    `labels` is int32 class ids for classification and float32 scores for regression.
    `text_b` is None for single-sentence tasks.
    """

    text_a: list[str]
    text_b: list[str] | None
    labels: np.ndarray
    source: str

    def __len__(self) -> int:
        return len(self.text_a)


def take(examples: Examples, rows: np.ndarray) -> Examples:
    """The examples at `rows`, in that order."""
    return Examples(
        [examples.text_a[i] for i in rows],
        None if examples.text_b is None else [examples.text_b[i] for i in rows],
        examples.labels[rows],
        examples.source,
    )


def load_split(task: Task, data_dir: str | os.PathLike | None, split: str) -> Examples:
    """Loads `split` ("train", "validation" or "test") of `task`.

    `data_dir` is the directory holding the task's own files (e.g. `.../glue/sst2`, see
    `task.files`); None loads `task.hub_name` from the HF hub instead.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if data_dir is None:
        return _load_hub(task, split)
    return _load_local(task, os.fspath(data_dir), split)


def _load_local(task: Task, data_dir: str, split: str) -> Examples:
    if not os.path.isdir(data_dir):
        raise DataError(
            f"data directory {data_dir!r} for task {task.name} does not exist; pass the "
            f"directory holding {sorted(task.files.values())} (e.g. <data root>/{task.subdir})"
        )
    if split not in task.files:
        raise DataError(
            f"task {task.name} has no local {split!r} split; it has {sorted(task.files)}"
        )
    path = os.path.join(data_dir, task.files[split])
    if not os.path.isfile(path):
        present = sorted(os.listdir(data_dir))
        raise DataError(
            f"{split} file {path!r} for task {task.name} is missing; files present in "
            f"{data_dir!r}: {present or 'none'}"
        )
    names = _column_names(task, path)
    table = _read_tsv(path, names, task.has_header)
    first_line = 2 if task.has_header else 1  # 1-based line number of the first data row
    if not table[names[0]]:
        raise DataError(
            f"{path!r} has no data rows; task {task.name} needs a non-empty {split} split"
        )
    labels = _parse_labels(task, table[task.label_column], path, first_line)
    texts = [_clean_texts(table[c], path, c, first_line) for c in task.text_columns]
    return Examples(
        text_a=texts[0], text_b=texts[1] if len(texts) > 1 else None, labels=labels, source=path
    )


def _column_names(task: Task, path: str) -> list[str]:
    """Column names of `path`: from its header (BOM stripped) or from the task."""
    if not task.has_header:
        return list(task.column_names)
    # utf-8-sig drops the BOM GLUE's MRPC files start with.
    with open(path, encoding="utf-8-sig") as f:
        header = f.readline().rstrip("\r\n")
    if not header:
        raise DataError(f"{path!r} is empty (no header line); task {task.name} expects a header")
    names = [name.strip() for name in header.split("\t")]
    missing = [c for c in task.required_columns if c not in names]
    if missing:
        raise DataError(
            f"{path!r} lacks columns {missing} needed by task {task.name}: expected "
            f"{list(task.required_columns)}, found {names}"
        )
    return names


def _read_tsv(path: str, names: list[str], has_header: bool) -> dict[str, list[str]]:
    """Reads every column as strings through `datasets`' CSV builder."""
    if os.path.getsize(path) == 0:
        raise DataError(f"{path!r} is empty; expected a tab-separated file")
    features = datasets.Features({n: datasets.Value("string") for n in names})
    try:
        dataset = datasets.load_dataset(
            "csv",
            data_files={"train": path},
            split="train",
            delimiter="\t",
            # GLUE texts contain unbalanced quote characters: never treat them as quoting.
            quoting=csv.QUOTE_NONE,
            column_names=names,
            header=0 if has_header else None,
            features=features,
            # Keep "NA"/"null"/"" as text, and blank lines as rows, so row i is line i+offset.
            keep_default_na=False,
            skip_blank_lines=False,
        )
    except Exception as e:  # the builder wraps pandas' parse errors; name the file instead
        cause = e.__cause__ or e
        raise DataError(
            f"could not parse {path!r} as a tab-separated file with columns {names}: {cause}"
        ) from e
    return dataset.to_dict()  # columnar to_dict is ~50x faster than iterating Columns


def _clean_texts(values: list[str | None], path: str, column: str, first_line: int) -> list[str]:
    for i, value in enumerate(values):
        if value is None:  # a row with too few fields
            raise DataError(f"{path!r} line {i + first_line}: column {column!r} is missing")
    return [value.strip() for value in values]


def _parse_labels(task: Task, raw: list[str | None], path: str, first_line: int) -> np.ndarray:
    """Maps raw label strings to int32 ids, or float32 scores for regression."""
    if task.is_regression:
        return _parse_scores(task, raw, path, first_line)
    label_to_id = task.label_to_id
    ids = np.empty(len(raw), np.int32)
    for i, value in enumerate(raw):
        label_id = label_to_id.get((value or "").strip())
        if label_id is None:
            raise DataError(
                f"{path!r} line {i + first_line}: label {value!r} is not one of "
                f"{sorted(label_to_id)} for task {task.name}; fix or remove the row"
            )
        ids[i] = label_id
    return ids


def _parse_scores(task: Task, raw: list[str | None], path: str, first_line: int) -> np.ndarray:
    low, high = task.label_range or (-math.inf, math.inf)
    scores = np.empty(len(raw), np.float32)
    for i, value in enumerate(raw):
        try:
            score = float(value)
        except (TypeError, ValueError):
            score = math.nan
        if not low <= score <= high:  # also rejects NaN
            raise DataError(
                f"{path!r} line {i + first_line}: score {value!r} is not a number in "
                f"[{low}, {high}] for task {task.name}; fix or remove the row"
            )
        scores[i] = score
    return scores


def _load_hub(task: Task, split: str) -> Examples:
    """Loads a split from the HF hub; labels there are already ids (ClassLabel) or floats."""
    source = "hub:" + "/".join(task.hub_name) + f"[{split}]"
    dataset = datasets.load_dataset(*task.hub_name, split=split)
    columns = (*(task.hub_text_columns or task.text_columns), task.hub_label_column)
    missing = [c for c in columns if c not in dataset.column_names]
    if missing:
        raise DataError(f"{source} lacks columns {missing}; found {dataset.column_names}")
    table = dataset.select_columns(list(columns)).to_dict()
    if not table[columns[0]]:
        raise DataError(f"{source} is empty")
    texts = [[t.strip() for t in table[c]] for c in columns[:-1]]
    raw_labels = table[columns[-1]]
    if task.is_regression:
        labels = np.asarray(raw_labels, np.float32)
    else:
        labels = np.asarray(raw_labels, np.int32)
        bad = np.flatnonzero((labels < 0) | (labels >= task.num_labels))
        if bad.size:
            # GLUE test splits carry label -1: their labels are hidden.
            raise DataError(
                f"{source} row {bad[0]}: label {labels[bad[0]]} outside 0..{task.num_labels - 1} "
                "(hub test splits of GLUE have hidden labels, -1)"
            )
    return Examples(texts[0], texts[1] if len(texts) > 1 else None, labels, source)


def split_files(task: Task, data_dir: str | os.PathLike | None, split: str) -> list[str]:
    """The local files `split` of `task` is read from ([] for a hub split), after checking
    they exist, so a cache can fingerprint them before reading a row."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; expected one of {SPLITS}")
    if data_dir is None:
        return []
    data_dir = os.fspath(data_dir)
    if split not in task.files:
        raise DataError(
            f"task {task.name} has no local {split!r} split; it has {sorted(task.files)}"
        )
    path = os.path.join(data_dir, task.files[split])
    if not os.path.isfile(path):
        present = sorted(os.listdir(data_dir)) if os.path.isdir(data_dir) else "no such directory"
        raise DataError(
            f"{split} file {path!r} for task {task.name} is missing; files present in "
            f"{data_dir!r}: {present or 'none'}"
        )
    return [path]


def iter_split_chunks(
    task: Task, data_dir: str | os.PathLike | None, split: str, chunk_rows: int
) -> Iterator[Examples]:
    """`split` of `task` as validated Examples of at most `chunk_rows` rows, in file order.

    Local files stream through `datasets`' CSV builder (`streaming=True`: pandas reads
    `chunk_rows` lines at a time, no Arrow copy of the file), so memory does not grow with
    the file. A hub split is loaded whole and then cut into chunks.
    """
    if data_dir is None:
        examples = load_split(task, None, split)
        for start in range(0, len(examples), chunk_rows):
            yield take(examples, np.arange(start, min(start + chunk_rows, len(examples))))
        return
    (path,) = split_files(task, data_dir, split)
    if os.path.getsize(path) == 0:
        raise DataError(f"{path!r} is empty; expected a tab-separated file")
    names = _column_names(task, path)
    stream = datasets.load_dataset(
        "csv",
        data_files={"train": path},
        split="train",
        streaming=True,
        delimiter="\t",
        quoting=csv.QUOTE_NONE,
        column_names=names,
        header=0 if task.has_header else None,
        features=datasets.Features({n: datasets.Value("string") for n in names}),
        keep_default_na=False,
        skip_blank_lines=False,
        chunksize=chunk_rows,
    )
    line = 2 if task.has_header else 1  # 1-based line number of the chunk's first row
    rows = 0
    try:
        for table in stream.iter(batch_size=chunk_rows):
            labels = _parse_labels(task, table[task.label_column], path, line)
            texts = [_clean_texts(table[c], path, c, line) for c in task.text_columns]
            line, rows = line + len(labels), rows + len(labels)
            yield Examples(texts[0], texts[1] if len(texts) > 1 else None, labels, path)
    except DataError:
        raise
    except Exception as e:  # the builder wraps pandas' parse errors; name the file instead
        cause = e.__cause__ or e
        raise DataError(
            f"could not parse {path!r} as a tab-separated file with columns {names}: {cause}"
        ) from e
    if not rows:
        raise DataError(
            f"{path!r} has no data rows; task {task.name} needs a non-empty {split} split"
        )
