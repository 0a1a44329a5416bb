"""Translation pairs (a source text and its reference translation) from local files or an HF
`datasets` split.

  read_pairs      a split -> `Pairs`: sources, targets, and where each row came from
  dataset_split   an HF dataset split by hub name, or from a `save_to_disk` directory

Files, by `task.format`: `jsonl` (read by `row_files.json_rows`), `csv` / `tsv` (by
`row_files.delimited_rows`, the one reader train and predict share), `parquet` (pyarrow,
batch by batch); `hub` loads `task.hub_name`. The two columns are `task.source_column` and
`task.target_column`. A missing column, a missing or empty cell is a `DataError` naming the
file and the line (or row), before any tokenizing: an empty source would train the model to
answer nothing with something, and an empty reference cannot be scored.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from finetune_jax.data import row_files, text_sources
from finetune_jax.data.row_files import DataError

FILE_FORMATS = ("jsonl", "csv", "tsv", "parquet")


@dataclasses.dataclass
class Pairs:
    """One split's pairs in file order, texts as written (the tokenizer normalises them)."""

    sources: list[str]
    targets: list[str]
    where: list[str]  # per row: "'file' line N" (or "hub:name[split] row i"), for messages

    def __len__(self) -> int:
        return len(self.sources)


def read_pairs(task: Any, data_dir: str | None, split: str) -> Pairs:
    """Every (source, target) pair of `split` ("train", "validation" or "test")."""
    pairs = Pairs([], [], [])
    if task.format == "hub":
        records = _dataset_records(task, split)
    else:
        records = (
            r
            for path in text_sources.split_files(task, data_dir, split)
            for r in _file_records(task, path)
        )
    for where, record in records:
        _check_columns(record, task, where)
        pairs.sources.append(_text(record[task.source_column], task.source_column, where))
        pairs.targets.append(_text(record[task.target_column], task.target_column, where))
        pairs.where.append(where)
    if not pairs.sources:
        raise DataError(f"the {split} split of task {task.name} holds no pair")
    return pairs


def _file_records(task: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if task.format not in FILE_FORMATS:
        raise DataError(
            f"data.format={task.format!r} (task {task.name}): translation reads "
            f"{', '.join(FILE_FORMATS)} files or 'hub' (data.hub_name)"
        )
    if task.format == "jsonl":
        for line, record in row_files.json_rows(path):
            yield f"{path!r} line {line}", record
    elif task.format in ("csv", "tsv"):
        delimiter = "\t" if task.format == "tsv" else ","
        for line, record in row_files.delimited_rows(path, delimiter):
            yield f"{path!r} line {line}", record
    else:
        import pyarrow.parquet as pq  # noqa: PLC0415 (datasets' dependency; parquet only)

        number = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                number += 1
                yield f"{path!r} row {number}", record


def dataset_split(name: str, split: str) -> Any:
    """Split `split` of an HF dataset: a directory written by `save_to_disk` (a DatasetDict,
    or one Dataset as its train split), else anything `datasets.load_dataset` takes (a hub
    name, a directory of data files)."""
    import datasets  # noqa: PLC0415 (slow to import; only hub data needs it here)

    saved = any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json"))
    if not saved:
        try:
            return datasets.load_dataset(name, split=split)
        except Exception as e:  # no network, unknown name or split: say which
            raise DataError(f"could not load hub:{name}[{split}] (data.hub_name): {e}") from e
    loaded = datasets.load_from_disk(name)
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{name!r} (data.hub_name) has splits {sorted(loaded)}, not {split!r}")
        return loaded[split]
    if split != "train":
        raise DataError(f"{name!r} (data.hub_name) is one dataset (the train split), not {split!r}")
    return loaded


def _dataset_records(task: Any, split: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if not task.hub_name:
        raise DataError(f"task {task.name} has data.format='hub' but no data.hub_name")
    dataset = dataset_split(task.hub_name, split)
    columns = [c for c in (task.source_column, task.target_column) if c in dataset.column_names]
    source = f"hub:{task.hub_name}[{split}]"
    if len(columns) < 2:
        _check_columns(dict.fromkeys(dataset.column_names), task, source)
    for index, record in enumerate(dataset.select_columns(columns)):
        yield f"{source} row {index}", record


def _check_columns(record: dict[str, Any], task: Any, where: str) -> None:
    missing = [c for c in (task.source_column, task.target_column) if c not in record]
    if missing:
        raise DataError(
            f"{where}: no column(s) {missing} (data.source_column / data.target_column); "
            f"found {sorted(record)}"
        )


def _text(value: Any, column: str, where: str) -> str:
    if isinstance(value, str) and value.strip():
        return value
    problem = (
        "missing"
        if value is None
        else "empty"
        if isinstance(value, str)
        else f"not text ({value!r:.40})"
    )
    raise DataError(f"{where}: column {column!r} is {problem}; fill or remove the row")
