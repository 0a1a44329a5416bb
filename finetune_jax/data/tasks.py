"""Task registry: what `data.task` names, and how each kind is scored.

A `Task` (text classification, multi-label classification or regression; see
`text_tasks.py`), `ChatTask` (causal-LM SFT), `ImageTask` (image classification) or
`SpeechTask` is plain, frozen data; its `kind` picks the data pipeline, loss and eval.
`task_for(config.data)` returns the run's task: a text task with the `data.*` keys applied,
or the registered chat / image / speech task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

# The text part of the registry lives in text_tasks; its names are the registry's too.
from finetune_jax.data.text_tasks import (  # noqa: F401
    GENERIC,
    PRESETS,
    SPLITS,
    TASKS,
    Task,
    configured_task,
)


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
      label_names: class names, index = class id; None = taken from `data.label_names` or, when
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
    problem_type = "single_label_classification"
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
                f"task {self.name}: class names are not resolved yet (set data.label_names, or "
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


def choose_label_names(
    given: tuple[str, ...] | None,
    saved: tuple[str, ...] | None,
    discover: Callable[[], tuple[str, ...]],
) -> tuple[str, ...]:
    """A classifier's class names: `given` (data.label_names or the task's own), which must
    equal `saved` (the names a run in this workdir trained with, its label_names.json) when
    both exist; else `saved`, so a resumed or evaluated run keeps its ids; else `discover()`
    (read from the train split)."""
    if given is not None:
        if saved is not None and tuple(saved) != tuple(given):
            raise ValueError(
                f"data.label_names={tuple(given)} but this run was trained with class names "
                f"{tuple(saved)} (its label_names.json): its ids mean those; leave "
                "data.label_names empty, or train in a new workdir"
            )
        return tuple(given)
    return tuple(saved) if saved is not None else tuple(discover())


def get_task(name: str) -> Task | ChatTask | ImageTask | SpeechTask:
    """Returns the registered task `name`; raises ValueError naming the known tasks."""
    for registry in (CHAT_TASKS, IMAGE_TASKS, SPEECH_TASKS, TASKS):
        if name in registry:
            return registry[name]
    known = ", ".join(sorted([*TASKS, *CHAT_TASKS, *IMAGE_TASKS, *SPEECH_TASKS]))
    raise ValueError(f"unknown task {name!r}; known tasks: {known}")


def task_for(data: Any) -> Task | ChatTask | ImageTask | SpeechTask:
    """The task `config.data` describes: a text task with the data.* keys applied
    (`configured_task`), or the registered chat / image / speech task."""
    return configured_task(data) if data.task in TASKS else get_task(data.task)
