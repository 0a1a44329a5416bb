"""Text tasks as data: one `Task` describes a text classification (single text or pair),
multi-label classification or regression task, and `config.data` fills it in.

`data.task` names either a generic kind (`text_classification`, `multi_label`,
`regression`) or a preset (`sst2`, ..., `rotten_tomatoes`), and a preset is nothing but the
default values of the same `data.*` keys (`format`, `files`, `text_columns`,
`label_column`, `label_names`, ...); `configured_task` applies the config on top of it.
`text_sources` reads a `Task`'s files or hub split; `metrics.compute_metrics` scores it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

SPLITS = ("train", "validation", "test")
FORMATS = ("csv", "tsv", "jsonl", "parquet", "hub")
# transformers' `problem_type` names, which the export writes as they are.
PROBLEM_TYPES = ("single_label_classification", "multi_label_classification", "regression")
_EXTENSIONS = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
}


@dataclasses.dataclass(frozen=True)
class Task:
    """One supervised text task (single text or a text pair).

    Attributes:
      name: the `data.task` it came from, e.g. "sst2" or "text_classification".
      problem_type: one of PROBLEM_TYPES; picks the label parsing, loss and metrics.
      format: one of FORMATS ("" = from the train file's extension).
      files: split name -> file path or glob, relative to the data directory unless absolute.
      text_columns: the one or two columns holding the input text(s).
      label_column: the column holding the label (class name, list of names, or a score).
      label_names: class names, index = class id; None for regression, and for a
        classification task whose names are still to be read from its train split.
      metrics: metric names understood by `finetune_jax.evaluation.metrics.compute_metrics`.
      main_metric: the metric used for model selection (keep-best checkpoints, sweeps).
      raw_labels: label strings as written in the files, index = class id; None means the
        label names themselves, or for presets the class ids ("0", "1", ...).
      label_delimiter: multi-label in csv / tsv: the separator inside the label cell.
      label_range: inclusive (low, high) bounds a regression target must lie in.
      has_header: whether the first line of a csv / tsv file names the columns.
      column_names: names for every column of a headerless file (None when there is a header).
      quote_none: csv / tsv without quoting (GLUE texts hold unbalanced quote characters).
      hub_name: positional arguments of `datasets.load_dataset` for the "hub" format.
      hub_text_columns / hub_label_column: the hub dataset's columns when they differ.
      subdir: conventional location of a preset's files under the shared data root.
    """

    name: str
    problem_type: str
    format: str
    files: Mapping[str, str] = dataclasses.field(hash=False)
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    raw_labels: tuple[str, ...] | None = None
    label_delimiter: str = "|"
    label_range: tuple[float, float] | None = None
    has_header: bool = True
    column_names: tuple[str, ...] | None = None
    quote_none: bool = False
    hub_name: tuple[str, ...] = ()
    hub_text_columns: tuple[str, ...] | None = None
    hub_label_column: str | None = None
    subdir: str = ""

    def __post_init__(self):
        # Catch preset and config typos before anything is read.
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(
                f"task {self.name}: problem_type {self.problem_type!r} not in {PROBLEM_TYPES}"
            )
        if self.format not in ("", *FORMATS):
            raise ValueError(
                f"data.format={self.format!r} (task {self.name}): expected one of {FORMATS} "
                "or '' (the preset's, else the train file's extension)"
            )
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(
                f"data.text_columns={self.text_columns!r} (task {self.name}): name 1 or 2 columns"
            )
        if self.main_metric not in self.metrics:
            raise ValueError(f"task {self.name}: main_metric {self.main_metric!r} not in metrics")
        if not self.has_header and self.column_names is None:
            raise ValueError(f"task {self.name}: a headerless file needs column_names")
        if self.raw_labels is not None and self.label_names is not None:
            if len(self.raw_labels) != len(self.label_names):
                raise ValueError(f"task {self.name}: raw_labels and label_names differ in length")
        if self.label_names is not None and len(set(self.label_names)) != len(self.label_names):
            raise ValueError(
                f"data.label_names={self.label_names!r} (task {self.name}): names repeat"
            )
        if self.is_regression and self.label_names is not None:
            raise ValueError(
                f"data.label_names={self.label_names!r}: task {self.name} is a regression "
                "(one float score per row); leave data.label_names empty"
            )
        unknown = set(self.files) - set(SPLITS)
        if unknown:
            raise ValueError(f"task {self.name}: unknown split names {sorted(unknown)}")

    kind = "text_classification"  # its `tasks` kind: data pipeline, loss, eval, export

    @property
    def is_regression(self) -> bool:
        """True when the label is a float score rather than a class id."""
        return self.problem_type == "regression"

    @property
    def is_multi_label(self) -> bool:
        """True when each row carries a set of classes (multi-hot targets, sigmoid loss)."""
        return self.problem_type == "multi_label_classification"

    @property
    def num_labels(self) -> int:
        """Width of the model's output head: number of classes, or 1 for regression."""
        if self.is_regression:
            return 1
        if self.label_names is None:
            raise ValueError(
                f"task {self.name}: class names are not resolved yet (set data.label_names, "
                "or build the run's loader, which reads them from the train split)"
            )
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (two text columns)."""
        return len(self.text_columns) == 2

    @property
    def label_to_id(self) -> dict[str, int]:
        """Raw label string in the files -> class id (empty for regression)."""
        if self.label_names is None:
            return {}
        raw = self.raw_labels or self.label_names
        return {label: i for i, label in enumerate(raw)}

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Columns a local file must have."""
        return (*self.text_columns, self.label_column)

    def hub_columns(self) -> tuple[tuple[str, ...], str]:
        """(text columns, label column) of the hub dataset."""
        return (
            self.hub_text_columns or self.text_columns,
            self.hub_label_column or self.label_column,
        )


def _glue(name: str, **fields: Any) -> Task:
    """A GLUE preset: its TSV files as GLUE ships them (no quoting, ids as labels)."""
    defaults = dict(
        name=name,
        problem_type="single_label_classification",
        format="tsv",
        files={"train": "train.tsv", "validation": "dev.tsv"},
        text_columns=("sentence",),
        label_column="label",
        metrics=("accuracy",),
        main_metric="accuracy",
        raw_labels=("0", "1"),
        quote_none=True,
        hub_name=("glue", name),
        subdir=f"glue/{name}",
    )
    return Task(**(defaults | fields))


# The presets: default values of the data.* keys for well-known data sets.
PRESETS: dict[str, Task] = {
    "sst2": _glue("sst2", label_names=("negative", "positive")),
    "mrpc": _glue(
        "mrpc",
        text_columns=("#1 String", "#2 String"),
        label_column="Quality",
        label_names=("not_equivalent", "equivalent"),
        # BERT and most papers report F1 for MRPC.
        metrics=("accuracy", "f1"),
        main_metric="f1",
        hub_text_columns=("sentence1", "sentence2"),
        hub_label_column="label",
    ),
    "rte": _glue(
        "rte",
        text_columns=("sentence1", "sentence2"),
        label_names=("entailment", "not_entailment"),
        raw_labels=None,  # the files hold the names, in the order of HF's glue/rte ids
    ),
    "cola": _glue(
        "cola",
        has_header=False,
        column_names=("source", "label", "original_judgement", "sentence"),
        label_names=("unacceptable", "acceptable"),
        metrics=("matthews_corrcoef", "accuracy"),
        main_metric="matthews_corrcoef",
    ),
    "stsb": _glue(
        "stsb",
        problem_type="regression",
        text_columns=("sentence1", "sentence2"),
        label_column="score",
        label_names=None,
        raw_labels=None,
        # BERT reports Spearman for STS-B; GLUE reports both.
        metrics=("pearson", "spearman"),
        main_metric="spearman",
        hub_label_column="label",
        label_range=(0.0, 5.0),
    ),
    "rotten_tomatoes": _glue(
        "rotten_tomatoes",
        files={"train": "train.tsv", "validation": "validation.tsv", "test": "test.tsv"},
        text_columns=("text",),
        label_names=("neg", "pos"),
        hub_name=("cornell-movie-review-data/rotten_tomatoes",),
        subdir="rotten_tomatoes",
    ),
}

# The generic kinds: your own files, described entirely by data.* keys.
GENERIC: dict[str, Task] = {
    "text_classification": Task(
        name="text_classification",
        problem_type="single_label_classification",
        format="",
        files={},
        text_columns=("text",),
        label_column="label",
        label_names=None,
        metrics=("accuracy", "macro_f1"),
        main_metric="accuracy",
    ),
    "multi_label": Task(
        name="multi_label",
        problem_type="multi_label_classification",
        format="",
        files={},
        text_columns=("text",),
        label_column="labels",
        label_names=None,
        metrics=("micro_f1", "macro_f1", "subset_accuracy"),
        main_metric="micro_f1",
    ),
    "regression": Task(
        name="regression",
        problem_type="regression",
        format="",
        files={},
        text_columns=("text",),
        label_column="label",
        label_names=None,
        metrics=("pearson", "spearman"),
        main_metric="spearman",
    ),
}
TASKS: dict[str, Task] = PRESETS | GENERIC  # every `data.task` value of a text task


def configured_task(data: Any) -> Task:
    """The text task `data.task` with `config.data`'s non-empty keys applied on top.

    `data` is `config.data`. Keys: `format`, `files.{train,validation,test}`,
    `text_columns`, `label_column`, `label_names`, `label_delimiter`, `label_range`,
    `hub_name`. A preset's own values stay where a key is empty.
    """
    task = TASKS[data.task]
    files = {split: data.files[split] for split in SPLITS if data.files[split]}
    changes: dict[str, Any] = {}
    if files:  # your own files replace a preset's whole file set
        changes["files"] = files
    if data.format or files:  # "" with files: from the train file's extension, below
        changes["format"] = data.format
    if data.text_columns:
        changes["text_columns"] = tuple(data.text_columns)
        changes["hub_text_columns"] = None
    if data.label_column:
        changes["label_column"] = data.label_column
        changes["hub_label_column"] = None
    if data.label_names:
        changes["label_names"] = tuple(str(name) for name in data.label_names)
        changes["raw_labels"] = None  # the files hold these names (or their ids)
    if data.label_delimiter:
        changes["label_delimiter"] = data.label_delimiter
    if data.label_range:
        changes["label_range"] = _label_range(data.label_range)
    if data.hub_name:
        changes["hub_name"] = (data.hub_name,)
    if task.name in PRESETS and not (files or data.format or data.dir):
        changes["format"] = "hub"  # no local files named: the preset's hub dataset
    if task.name in PRESETS and (files or data.format not in ("", "hub", task.format)):
        # Another file layout than the preset's GLUE files: read it as an ordinary file.
        changes |= {"quote_none": False, "has_header": True, "column_names": None}
        changes["raw_labels"] = None
    task = dataclasses.replace(task, **changes) if changes else task
    if not task.format and task.files:
        task = dataclasses.replace(task, format=files_format(task.files))
    return task


def files_format(files: Mapping[str, str]) -> str:
    """The format the train file's (else the first file's) extension implies."""
    return format_of(files.get("train") or next(iter(files.values())))


def _label_range(value: Any) -> tuple[float, float]:
    if len(value) != 2 or not float(value[0]) <= float(value[1]):
        raise ValueError(
            f"data.label_range={tuple(value)!r}: expected (low, high) with low <= high"
        )
    return float(value[0]), float(value[1])


def format_of(path: str) -> str:
    """The file format a path's extension implies (".csv" -> "csv"); ValueError otherwise."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in _EXTENSIONS:
        raise ValueError(
            f"cannot tell the format of {path!r} from its extension; set data.format to one "
            f"of {FORMATS}"
        )
    return _EXTENSIONS[extension]
