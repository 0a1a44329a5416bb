"""Speech recognition kind: audio -> transcript with an encoder-decoder (Whisper), trained on
the next-token loss of the transcript and scored by the WER / CER of the transcripts every
eval generates (greedy, or beam search of `generate.num_beams`)."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from finetune_jax.data import speech_loader
from finetune_jax.evaluation.transcription import Transcriber, TranscriptScorer
from finetune_jax.tasks import losses
from finetune_jax.tasks.kind import TaskKind


@dataclasses.dataclass(frozen=True)
class SpeechTask:
    """A speech recognition task. Rows come from `{data.dir}/{split}.jsonl|csv` (`audio` path
    + transcript) or an HF dataset (`data.hub_name`); see `data/audio_sources.py`. Scored by
    the held-out loss per target token, teacher-forced token accuracy, and the word /
    character error rates of generated transcripts (`evaluation/transcription.py`,
    normalisation in `wer.py`)."""

    name: str
    kind = "speech_recognition"
    metrics = ("token_accuracy",)  # from the teacher-forced eval step
    generated_metrics = ("wer", "cer")  # from transcripts generated in every eval
    main_metric = "wer"
    label_names = None  # the decoder's LM head, no class head
    quote_none = False  # predict reads .tsv rows as ordinary quoted TSV


SPEECH_TASKS: dict[str, SpeechTask] = {
    "speech": SpeechTask(name="speech"),
    "speech_commands": SpeechTask(name="speech_commands"),
}


class SpeechRecognition(TaskKind):
    """Cached log-mel features in, transcript tokens out (see `data/speech_loader.py`)."""

    name = "speech_recognition"
    tasks = SPEECH_TASKS
    per_token = True
    eval_count = "tokens"  # transcript target tokens (and each EOS)
    beam_search = True
    eval_records = "transcripts"
    data_keys = frozenset(
        {
            "hub_name",
            "audio_column",
            "transcript_column",
            "audio_seconds",
            "max_length",
            "cache_dir",
        }
    )

    def loader(self, config, task, preprocessor, model_ref, saved_names=None):
        return speech_loader.SpeechData(config, task, preprocessor, model_ref)

    def batch_spec(self, config, task):
        return speech_loader.SpeechData.batch_spec(config, task)

    def loss(self, task):
        return losses.next_token_loss

    def metric_names(self, task) -> tuple[str, ...]:
        return (*super().metric_names(task), *task.generated_metrics)

    def evaluator(self, config, module, data, tokenizer) -> TranscriptScorer | None:
        if data is None:  # an abstract (preflight) build
            return None
        _, frames = data.window()
        if frames > 2 * module.config.max_source_positions:  # the encoder's position table
            raise ValueError(
                f"data.audio_seconds={config.data.audio_seconds} gives {frames} feature "
                f"frames, more than the model's window of {2 * module.config.max_source_positions}"
            )
        transcriber = Transcriber(
            module,
            data.generation,
            tokenizer,
            config.generate.max_new_tokens,
            num_beams=config.generate.num_beams,
        )
        return TranscriptScorer(transcriber)

    def export_generation(self, setup) -> dict[str, Any]:
        return setup.data.generation  # the model's own: prompt, suppressed tokens, EOS

    def export_files(self, setup) -> tuple[str, ...]:
        # How audio becomes features travels with the model.
        return (os.path.join(setup.model_ref, "preprocessor_config.json"),)


KIND = SpeechRecognition()
