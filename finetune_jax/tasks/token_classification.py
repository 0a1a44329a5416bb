"""Token classification (NER) kind: one tag per word, IOB1 / IOB2 tags, trained per word
piece on a token-classification head, scored at the entity level with seqeval's semantics
(micro precision / recall / F1 and F1 per type); predict writes the entities of raw
sentences with character offsets, as transformers' token-classification pipeline does."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import ml_collections

from finetune_jax.data import ner_loader, ner_tags, text_tasks
from finetune_jax.evaluation import entities, prediction
from finetune_jax.tasks import losses
from finetune_jax.tasks.kind import TaskKind

FORMATS = ("conll", "jsonl", "parquet", "hub")
_EXTENSIONS = {".conll": "conll", ".txt": "conll", ".bio": "conll", ".iob": "conll"}
ENTITY_METRICS = ("precision", "recall", "f1")


@dataclasses.dataclass(frozen=True)
class TokenTask:
    """A token-classification task: sentences of words, one tag per word.

    Attributes:
      name: the `data.task` it came from ("wnut16", "token_classification").
      format: one of FORMATS ("" = from the train file's extension).
      files: split -> file path or glob, relative to `data.dir` unless absolute.
      tokens_column / tags_column: jsonl / parquet / hub: the word list and the tag list.
      tag_scheme: how the files' tags mark entity starts (ner_tags.SCHEMES).
      label_names: tag names, index = label id ("O" first); None = from the train split.
      hub_name: the `datasets.load_dataset` name for the "hub" format.
      subdir: conventional location of a preset's files under the shared data root.
    """

    name: str
    format: str
    files: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    tokens_column: str = "tokens"
    tags_column: str = "tags"
    tag_scheme: str = "IOB2"
    label_names: tuple[str, ...] | None = None
    hub_name: str = ""
    subdir: str = ""
    kind = "token_classification"
    metrics = ("token_accuracy",)  # over the labelled pieces, from the eval step
    main_metric = "f1"  # entity-level micro F1
    is_regression = False
    is_multi_label = False
    quote_none = False  # predict reads .tsv rows as ordinary quoted TSV

    def __post_init__(self):
        if self.format not in ("", *FORMATS):
            raise ValueError(
                f"data.format={self.format!r} (task {self.name}): expected one of {FORMATS}"
            )
        if self.tag_scheme not in ner_tags.SCHEMES:
            raise ValueError(
                f"data.tag_scheme={self.tag_scheme!r}: expected one of {ner_tags.SCHEMES}"
            )
        unknown = set(self.files) - set(text_tasks.SPLITS)
        if unknown:
            raise ValueError(f"task {self.name}: unknown split names {sorted(unknown)}")

    @property
    def num_labels(self) -> int:
        if self.label_names is None:
            raise ValueError(
                f"task {self.name}: tag names are not resolved yet (set data.label_names, or "
                "build the run's loader, which reads them from the train split)"
            )
        return len(self.label_names)


TOKEN_TASKS: dict[str, TokenTask] = {
    # WNUT-16-style English tweets, 10 entity types (../shared/data/ner_wnut16).
    "wnut16": TokenTask(
        name="wnut16",
        format="conll",
        files={"train": "train.conll", "validation": "validation.conll"},
        subdir="ner_wnut16",
    ),
    # Your own files, described by the data.* keys.
    "token_classification": TokenTask(name="token_classification", format=""),
}


def configured_task(data: ml_collections.ConfigDict) -> TokenTask:
    """`data.task` with the non-default `data.*` keys applied (your files replace a preset's)."""
    task = TOKEN_TASKS[data.task]
    files = {split: data.files[split] for split in text_tasks.SPLITS if data.files[split]}
    changes: dict[str, Any] = {
        "tokens_column": data.tokens_column,
        "tags_column": data.tags_column,
        "tag_scheme": data.tag_scheme,
    }
    if files:
        changes |= {"files": files, "format": data.format}
    elif data.format:
        changes["format"] = data.format
    if data.label_names:
        changes["label_names"] = tuple(str(name) for name in data.label_names)
    if data.hub_name:
        changes["hub_name"] = data.hub_name
    task = dataclasses.replace(task, **changes)
    if not task.format and task.files:  # from the train file's extension
        path = task.files.get("train") or next(iter(task.files.values()))
        extension = os.path.splitext(path)[1].lower()
        fmt = _EXTENSIONS.get(extension) or text_tasks.format_of(path)
        task = dataclasses.replace(task, format=fmt)
    return task


class TokenClassification(TaskKind):
    """Word tags on word pieces (see `data/ner_loader.py`); entity-level scores."""

    name = "token_classification"
    tasks = TOKEN_TASKS
    predicts_with_head = True
    eval_count = "tokens"  # the tagged word pieces
    eval_records = "entities"
    data_keys = frozenset(
        {
            "format",
            "hub_name",
            "label_names",
            "max_length",
            "buckets",
            "text_columns",  # predict: the raw-text column
            "tokens_column",
            "tags_column",
            "tag_scheme",
            "label_pieces",
        }
    )

    def configured(self, data):
        return configured_task(data)

    def resolve(self, config, task, saved_names=None):
        return ner_loader.resolve_task(config, task, saved_names)

    def model_overrides(self, config, task) -> dict[str, Any]:
        return {"num_labels": task.num_labels}

    def loader(self, config, task, preprocessor, model_ref, saved_names=None):
        return ner_loader.NerData(config, task, preprocessor, saved_names)

    def batch_spec(self, config, task):
        return ner_loader.NerData.batch_spec(config, task)

    def loss(self, task):
        return losses.classification_loss  # per piece: [B, L, C] logits, [B, L] labels

    def metric_names(self, task) -> tuple[str, ...]:
        types = () if task.label_names is None else ner_tags.entity_types(task.label_names)
        return (*super().metric_names(task), *ENTITY_METRICS, *(f"f1_{t}" for t in types))

    def evaluator(self, config, module, data, tokenizer):
        return None if data is None else entities.EntityScorer(data.task.label_names)

    def predictor(self, setup, params, source, threshold, files=None):
        return prediction.EntityPredictor(setup, params, source)

    def export_config(self, task) -> dict[str, Any]:
        return prediction.class_names_config(task.label_names)


KIND = TokenClassification()
