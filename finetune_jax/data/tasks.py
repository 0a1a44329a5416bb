"""Task definitions: where a task's data lives, which columns hold text (or images) and
label, and how it is scored.

A `Task` (text classification), `ChatTask` (causal-LM SFT) or `ImageTask` (image
classification) is plain, frozen data; its `kind` picks the data pipeline, loss and eval. `sources.load_split` reads it to load files or hub splits,
`metrics.compute_metrics` reads `metrics` to score predictions. Adding a sentence(-pair)
classification or regression task is one entry in `TASKS`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class Task:
    """One supervised text task.

    Attributes:
      name: registry key, e.g. "sst2".
      hub_name: positional arguments of `datasets.load_dataset`, e.g. ("glue", "sst2").
      files: split name -> file name inside the task's data directory.
      has_header: whether the first line of each file names the columns.
      column_names: names for every column of a headerless file (None when there is a header).
      text_columns: the one or two columns holding the input text(s), in local files.
      label_column: the column holding the label (a class string or a float score).
      label_names: human-readable class names, index = class id; None means regression.
      raw_labels: label strings as written in the files, index = class id; None means the
        class ids themselves ("0", "1", ...).
      metrics: metric names understood by `finetune_jax.evaluation.metrics.compute_metrics`.
      main_metric: the metric used for model selection (keep-best checkpoints, sweeps).
      hub_text_columns: text columns of the hub dataset when they differ from the files'.
      hub_label_column: label column of the hub dataset.
      label_range: inclusive (low, high) bounds a regression target must lie in.
      subdir: conventional location of the files under the shared data root.
    """

    name: str
    hub_name: tuple[str, ...]
    files: Mapping[str, str] = dataclasses.field(hash=False)
    has_header: bool
    column_names: tuple[str, ...] | None
    text_columns: tuple[str, ...]
    label_column: str
    label_names: tuple[str, ...] | None
    metrics: tuple[str, ...]
    main_metric: str
    raw_labels: tuple[str, ...] | None = None
    hub_text_columns: tuple[str, ...] | None = None
    hub_label_column: str = "label"
    label_range: tuple[float, float] | None = None
    subdir: str = ""

    def __post_init__(self):
        # Catch registry typos at import time rather than deep inside a run.
        if not 1 <= len(self.text_columns) <= 2:
            raise ValueError(f"task {self.name}: text_columns must name 1 or 2 columns")
        if self.main_metric not in self.metrics:
            raise ValueError(f"task {self.name}: main_metric {self.main_metric!r} not in metrics")
        if not self.has_header and self.column_names is None:
            raise ValueError(f"task {self.name}: a headerless file needs column_names")
        if self.raw_labels is not None and self.label_names is not None:
            if len(self.raw_labels) != len(self.label_names):
                raise ValueError(f"task {self.name}: raw_labels and label_names differ in length")
        unknown = set(self.files) - set(SPLITS)
        if unknown:
            raise ValueError(f"task {self.name}: unknown split names {sorted(unknown)}")

    kind = "classification"  # vs ChatTask.kind; picks the data pipeline, loss and eval

    @property
    def is_regression(self) -> bool:
        """True when the label is a float score rather than a class id."""
        return self.label_names is None

    @property
    def num_labels(self) -> int:
        """Width of the model's output head: number of classes, or 1 for regression."""
        return 1 if self.label_names is None else len(self.label_names)

    @property
    def is_pair(self) -> bool:
        """True for sentence-pair tasks (two text columns)."""
        return len(self.text_columns) == 2

    @property
    def label_to_id(self) -> dict[str, int]:
        """Raw label string in the files -> class id (empty for regression)."""
        if self.label_names is None:
            return {}
        raw = self.raw_labels or tuple(str(i) for i in range(len(self.label_names)))
        return {label: i for i, label in enumerate(raw)}

    @property
    def required_columns(self) -> tuple[str, ...]:
        """Columns a local file must have."""
        return (*self.text_columns, self.label_column)


_GLUE_SPLIT_FILES = {"train": "train.tsv", "validation": "dev.tsv"}

TASKS: dict[str, Task] = {
    "sst2": Task(
        name="sst2",
        hub_name=("glue", "sst2"),
        files=_GLUE_SPLIT_FILES,
        has_header=True,
        column_names=None,
        text_columns=("sentence",),
        label_column="label",
        label_names=("negative", "positive"),
        metrics=("accuracy",),
        main_metric="accuracy",
        subdir="glue/sst2",
    ),
    "mrpc": Task(
        name="mrpc",
        hub_name=("glue", "mrpc"),
        files=_GLUE_SPLIT_FILES,
        has_header=True,
        column_names=None,
        text_columns=("#1 String", "#2 String"),
        label_column="Quality",
        label_names=("not_equivalent", "equivalent"),
        # BERT and most papers report F1 for MRPC.
        metrics=("accuracy", "f1"),
        main_metric="f1",
        hub_text_columns=("sentence1", "sentence2"),
        subdir="glue/mrpc",
    ),
    "rte": Task(
        name="rte",
        hub_name=("glue", "rte"),
        files=_GLUE_SPLIT_FILES,
        has_header=True,
        column_names=None,
        text_columns=("sentence1", "sentence2"),
        label_column="label",
        label_names=("entailment", "not_entailment"),
        raw_labels=("entailment", "not_entailment"),  # the ids HF's glue/rte uses
        metrics=("accuracy",),
        main_metric="accuracy",
        subdir="glue/rte",
    ),
    "cola": Task(
        name="cola",
        hub_name=("glue", "cola"),
        files=_GLUE_SPLIT_FILES,
        has_header=False,
        column_names=("source", "label", "original_judgement", "sentence"),
        text_columns=("sentence",),
        label_column="label",
        label_names=("unacceptable", "acceptable"),
        metrics=("matthews_corrcoef", "accuracy"),
        main_metric="matthews_corrcoef",
        subdir="glue/cola",
    ),
    "stsb": Task(
        name="stsb",
        hub_name=("glue", "stsb"),
        files=_GLUE_SPLIT_FILES,
        has_header=True,
        column_names=None,
        text_columns=("sentence1", "sentence2"),
        label_column="score",
        label_names=None,
        # BERT reports Spearman for STS-B; GLUE reports both.
        metrics=("pearson", "spearman"),
        main_metric="spearman",
        hub_label_column="label",
        label_range=(0.0, 5.0),
        subdir="glue/stsb",
    ),
    "rotten_tomatoes": Task(
        name="rotten_tomatoes",
        hub_name=("cornell-movie-review-data/rotten_tomatoes",),
        files={"train": "train.tsv", "validation": "validation.tsv", "test": "test.tsv"},
        has_header=True,
        column_names=None,
        text_columns=("text",),
        label_column="label",
        label_names=("neg", "pos"),
        metrics=("accuracy",),
        main_metric="accuracy",
        subdir="rotten_tomatoes",
    ),
}


@dataclasses.dataclass(frozen=True)
class ChatTask:
    """Supervised fine-tuning of a causal LM on chat records (see `data/chat_sources.py`).

    Attributes:
      name: registry key.
      format: record format for `chat_sources.load_records` ("auto" detects it).
      answer_marker: for GSM8K-style answers, the marker before the final answer
        ("#### 42"); the eval script then scores generations by exact match of that answer.
    """

    name: str
    format: str
    answer_marker: str | None = None
    kind = "causal_lm"
    metrics = ("token_accuracy",)
    main_metric = "loss"  # held-out loss per trained token; lower is better
    num_labels = None  # a causal LM has no class head


CHAT_TASKS: dict[str, ChatTask] = {
    "chat": ChatTask(name="chat", format="auto"),
    "gsm8k": ChatTask(name="gsm8k", format="gsm8k", answer_marker="####"),
    "alpaca": ChatTask(name="alpaca", format="alpaca"),
    "messages": ChatTask(name="messages", format="messages"),
}


IMAGE_FORMATS = ("idx", "folder", "table", "hub", "elpv")


@dataclasses.dataclass(frozen=True)
class ImageTask:
    """Image classification (see `data/image_sources.py` for the formats).

    Attributes:
      name: registry key.
      format: how the images are stored: "idx" (MNIST-style IDX files), "folder" (one
        sub-folder per class), "table" (CSV / JSONL of image paths + labels), "hub" (an HF
        `datasets` dataset with an Image feature) or "elpv" (the `elpv-dataset` package).
      label_names: class names, index = class id; None = taken from `data.labels` or, when
        that is empty, discovered from the train split (sorted folder names / label values,
        or the dataset's ClassLabel names).
      files: split -> (images file, labels file), for the "idx" format.
      elpv_grades: for "elpv", defect probability -> class: False = defective (p >= 0.5)
        vs functional, True = the four levels 0, 1/3, 2/3, 1.
      subdir: conventional location of the files under the shared data root.
    """

    name: str
    format: str
    label_names: tuple[str, ...] | None = None
    files: Mapping[str, tuple[str, str]] = dataclasses.field(default_factory=dict, hash=False)
    elpv_grades: bool = False
    subdir: str = ""
    kind = "image_classification"
    metrics = ("accuracy",)
    main_metric = "accuracy"
    is_regression = False

    def __post_init__(self):
        if self.format not in IMAGE_FORMATS:
            raise ValueError(f"task {self.name}: format {self.format!r} not in {IMAGE_FORMATS}")

    @property
    def num_labels(self) -> int:
        if self.label_names is None:
            raise ValueError(
                f"task {self.name}: class names are not resolved yet (set data.labels, or "
                "build the run's loader, which reads them from the train split)"
            )
        return len(self.label_names)


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip

IMAGE_TASKS: dict[str, ImageTask] = {
    # Train only (the test images are not shipped): select on data.eval_split="holdout".
    "fashion_mnist": ImageTask(
        name="fashion_mnist",
        format="idx",
        label_names=FASHION_MNIST_CLASSES,
        files={"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")},
        subdir="fashion_mnist",
    ),
    "elpv_binary": ImageTask(
        name="elpv_binary", format="elpv", label_names=("functional", "defective")
    ),
    "elpv_grades": ImageTask(
        name="elpv_grades",
        format="elpv",
        label_names=("p=0", "p=1/3", "p=2/3", "p=1"),
        elpv_grades=True,
    ),
    "image_folder": ImageTask(name="image_folder", format="folder"),
    "image_table": ImageTask(name="image_table", format="table"),
    "image_hub": ImageTask(name="image_hub", format="hub"),
}


@dataclasses.dataclass(frozen=True)
class SpeechTask:
    """Speech recognition with an encoder-decoder (audio -> transcript), "seq2seq" kind.

    Rows come from `{data.dir}/{split}.jsonl|csv` (`audio` path + `text`) or an HF dataset
    (`data.hub_dataset`); see `data/audio_sources.py`. Scored by the held-out loss per
    target token, teacher-forced token accuracy, and the word / character error rates of
    greedy transcripts (`evaluation/transcription.py`, normalisation in `wer.py`).
    """

    name: str
    kind = "seq2seq"
    metrics = ("token_accuracy",)  # from the teacher-forced eval step
    generated_metrics = ("wer", "cer")  # from transcripts generated in every eval
    main_metric = "wer"
    num_labels = None  # the decoder's LM head, no class head


SPEECH_TASKS: dict[str, SpeechTask] = {
    "speech": SpeechTask(name="speech"),
    "speech_commands": SpeechTask(name="speech_commands"),
}


def get_task(name: str) -> Task | ChatTask | ImageTask | SpeechTask:
    """Returns the registered task `name`; raises ValueError naming the known tasks."""
    for registry in (CHAT_TASKS, IMAGE_TASKS, SPEECH_TASKS, TASKS):
        if name in registry:
            return registry[name]
    known = ", ".join(sorted([*TASKS, *CHAT_TASKS, *IMAGE_TASKS, *SPEECH_TASKS]))
    raise ValueError(f"unknown task {name!r}; known tasks: {known}")
