"""Translation kind: source text -> target text with an encoder-decoder (Marian), trained on the
teacher-forced next-token loss of the target and scored by the chrF / BLEU (sacrebleu) and
format-specifier preservation of the translations every eval generates (greedy, or beam search
of `generate.num_beams`); predict writes a `translation` per row."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import ml_collections

from finetune_jax.data import text_tasks, translation_loader, translation_sources
from finetune_jax.evaluation import prediction, translation_scores
from finetune_jax.evaluation.seq2seq_generation import Seq2SeqGenerator
from finetune_jax.tasks import losses
from finetune_jax.tasks.kind import TaskKind

FORMATS = (*translation_sources.FILE_FORMATS, "hub")


@dataclasses.dataclass(frozen=True)
class TranslationTask:
    """A translation task: pairs of a source text and its reference translation.

    Attributes:
      name: the `data.task` it came from ("l10n_en_pt_br", "translation").
      format: one of FORMATS ("" = from the train file's extension; "hub" with a hub name).
      files: split -> file path or glob, relative to `data.dir` unless absolute.
      source_column / target_column: the columns of the source text and its translation.
      hub_name: a `datasets.load_dataset` name or a `save_to_disk` directory ("hub" format).
      subdir: conventional location of a preset's files under the shared data root.
    """

    name: str
    format: str = ""
    files: Mapping[str, str] = dataclasses.field(default_factory=dict, hash=False)
    source_column: str = "en"
    target_column: str = "pt_BR"
    hub_name: str = ""
    subdir: str = ""
    kind = "translation"
    metrics = ("token_accuracy",)  # from the teacher-forced eval step
    generated_metrics = translation_scores.SCORES  # from translations generated in every eval
    main_metric = "chrf"
    label_names = None  # the decoder's LM head, no class head
    quote_none = False  # predict reads .tsv rows as ordinary quoted TSV

    def __post_init__(self):
        if self.format not in ("", *FORMATS):
            raise ValueError(
                f"data.format={self.format!r} (task {self.name}): expected one of {FORMATS}"
            )
        unknown = set(self.files) - set(text_tasks.SPLITS)
        if unknown:
            raise ValueError(f"task {self.name}: unknown split names {sorted(unknown)}")


TRANSLATION_TASKS: dict[str, TranslationTask] = {
    # English -> Brazilian Portuguese software messages (../shared/data/l10n_en_pt_br).
    "l10n_en_pt_br": TranslationTask(
        name="l10n_en_pt_br",
        format="jsonl",
        files={"train": "train.jsonl", "validation": "validation.jsonl"},
        subdir="l10n_en_pt_br",
    ),
    # Your own pairs, described by the data.* keys.
    "translation": TranslationTask(name="translation"),
}


def configured_task(data: ml_collections.ConfigDict) -> TranslationTask:
    """`data.task` with the `data.*` keys applied (your files replace a preset's; a hub name
    alone means the "hub" format)."""
    task = TRANSLATION_TASKS[data.task]
    files = {split: data.files[split] for split in text_tasks.SPLITS if data.files[split]}
    changes: dict[str, Any] = {
        "source_column": data.source_column,
        "target_column": data.target_column,
    }
    if files:
        changes |= {"files": files, "format": data.format}
    elif data.format or data.hub_name:
        changes["format"] = data.format or "hub"
    if data.hub_name:
        changes["hub_name"] = data.hub_name
    task = dataclasses.replace(task, **changes)
    if not task.format and task.files:
        task = dataclasses.replace(task, format=text_tasks.files_format(task.files))
    return task


class Translation(TaskKind):
    """Tokenized pairs in, target tokens out (see `data/translation_loader.py`)."""

    name = "translation"
    tasks = TRANSLATION_TASKS
    per_token = True
    eval_count = "tokens"  # target tokens (and each EOS)
    beam_search = True
    eval_records = "translations"
    data_keys = frozenset(
        {"format", "hub_name", "source_column", "target_column", "max_length", "buckets"}
    )

    def configured(self, data):
        return configured_task(data)

    def loader(self, config, task, preprocessor, model_ref, saved_names=None):
        return translation_loader.TranslationData(config, task, preprocessor, model_ref)

    def batch_spec(self, config, task):
        return translation_loader.TranslationData.batch_spec(config, task)

    def loss(self, task):
        return losses.next_token_loss

    def metric_names(self, task) -> tuple[str, ...]:
        return (*super().metric_names(task), *task.generated_metrics)

    def evaluator(self, config, module, data, tokenizer):
        if data is None:  # an abstract (preflight) build
            return None
        generator = Seq2SeqGenerator(
            module,
            data.generation,
            tokenizer,
            config.generate.max_new_tokens,
            # The decoder's position table (BART-style configs name it so).
            module.config.max_position_embeddings,
            num_beams=config.generate.num_beams,
        )
        return translation_scores.TranslationScorer(generator, data)

    def eval_samples(self, setup, params, split_data) -> tuple[list[dict], dict[str, Any]]:
        """No samples beyond the scorer's records; the eval states sacrebleu's signatures."""
        return [], translation_scores.signatures()

    def predictor(self, setup, params, source, threshold, files=None):
        return prediction.TranslationPredictor(setup, params, source)

    def export_generation(self, setup) -> dict[str, Any]:
        return setup.data.generation  # the model's own: start token, EOS, banned tokens


KIND = Translation()
