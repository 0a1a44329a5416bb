"""Text classification kind: single-label, multi-label and regression over one text or a
text pair, on a sequence-classification head (`data/text_tasks.py` describes the tasks)."""

from __future__ import annotations

from typing import Any

import ml_collections

from finetune_jax.data import prediction_io, text_batches, text_loader, text_tasks
from finetune_jax.evaluation import prediction
from finetune_jax.tasks import losses
from finetune_jax.tasks.kind import TaskKind

# A classifier's loss by transformers' `problem_type` of its task.
LOSSES = {
    "single_label_classification": losses.classification_loss,
    "multi_label_classification": losses.multi_label_loss,
    "regression": losses.regression_loss,
}


class TextClassification(TaskKind):
    """Sentence(-pair) classification, multi-label classification and regression."""

    name = "text_classification"
    tasks = text_tasks.TASKS
    predicts_with_head = True
    monitors = True
    label_prior = True
    data_keys = frozenset(
        {
            "format",
            "hub_name",
            "text_columns",
            "label_column",
            "label_names",
            "label_delimiter",
            "label_range",
            "max_length",
            "buckets",
            "cache_dir",
            "prefetch",
        }
    )

    def configured(self, data: ml_collections.ConfigDict) -> text_tasks.Task:
        return text_tasks.configured_task(data)

    def resolve(self, config, task, saved_names=None):
        return text_loader.resolve_text_task(config, task, saved_names)

    def model_overrides(self, config, task) -> dict[str, Any]:
        return {"num_labels": task.num_labels}

    def loader(self, config, task, preprocessor, model_ref, saved_names=None):
        return text_loader.ClassificationData(config, task, preprocessor, saved_names)

    def batch_spec(self, config, task):
        return text_loader.ClassificationData.batch_spec(config, task)

    def loss(self, task):
        return LOSSES[task.problem_type]

    def prediction_split(self, setup, rows, source: str):
        """(eval-batchable split, tokens per row, unknown tokens per row) of raw rows."""
        examples = prediction_io.text_examples(rows, setup.task.text_columns, source)
        split = text_batches.tokenize(examples, setup.tokenizer, setup.config.data.max_length)
        unk = setup.tokenizer.unk_token_id
        unknown = [int((ids == unk).sum()) for ids in split.input_ids]
        return split, split.lengths, unknown

    def predictor(self, setup, params, source, threshold, files=None):
        return prediction.LabelPredictor(setup, params, source, threshold)

    def export_config(self, task) -> dict[str, Any]:
        return prediction.label_config(task)

    def monitor_reference(self, setup, reference: str, rows: int):
        task = setup.task
        examples = setup.data.examples(reference)
        return prediction_io.example_chunks(examples, task.text_columns, task.label_column, rows)


KIND = TextClassification()
