"""Predictions of a trained run on chunks of unlabeled rows, through the same batching and
jitted model apply as eval (`Setup.data.eval_batches`, `Setup.predict_step`).

A predictor (chosen by the task's kind) maps a chunk of rows to one dict of output columns
per row: `LabelPredictor` for classification (`label` and `prob_<name>` per class;
multi-label the labels with probability >= threshold, a list, and the probabilities;
regression `score`), `EntityPredictor` for token classification (`entities` with character
offsets), `CompletionPredictor` for causal LMs (`completion`, greedy or sampled as
`generate.*` says, via `evaluation/lm_generation.py`), `TranslationPredictor` for translation
(`translation`, greedy or beam search as `generate.num_beams` says). Padding rows never come
back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from finetune_jax.data import prediction_io
from finetune_jax.data.translation_sources import Pairs
from finetune_jax.evaluation import entities, lm_samples

# Prompt buckets of causal-LM prediction: prompts are streamed, so the longest is unknown.
PROMPT_BUCKETS = (64, 128, 256, 512, 1024, 2048)


@dataclasses.dataclass
class ChunkOutputs:
    """What the model computes for a chunk's real rows, in order."""

    logits: np.ndarray  # float32 [N, num_labels]
    features: np.ndarray  # float32 [N, F]: the pooled features the head reads
    lengths: np.ndarray | None  # text: tokens per row (after truncation)
    unknown: np.ndarray | None  # text: unknown-token count per row


def model_outputs(setup, params, rows: Sequence[dict[str, Any]], source: str) -> ChunkOutputs:
    """Logits and pooled features of `rows` for a task whose kind predicts with its head,
    batched as eval batches them (the kind turns rows into an eval-batchable split)."""
    chunk, lengths, unknown = setup.kind.prediction_split(setup, rows, source)
    logits, features = [], []
    for batch in setup.data.eval_batches(chunk):
        out = jax.device_get(setup.predict_step(params, setup.put_batch(batch)))
        keep = np.asarray(out["weights"]) > 0  # the global batch's real rows
        logits.append(np.asarray(out["logits"])[keep])
        features.append(np.asarray(out["features"])[keep])
    if unknown is not None:
        unknown = np.asarray(unknown, np.int32)
    return ChunkOutputs(np.concatenate(logits), np.concatenate(features), lengths, unknown)


def probabilities(task, logits: np.ndarray) -> np.ndarray:
    """Class probabilities [N, C] from logits: softmax, or per-class sigmoid for multi-label."""
    if task.is_multi_label:
        return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    return softmax(logits)


def label_columns(
    task, label_names: Sequence[str], logits: np.ndarray, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Output columns per row: `score` (regression); `label` + `prob_<name>` per class."""
    if task.is_regression:
        return [{"score": float(v)} for v in logits[:, 0]]
    probs = probabilities(task, logits)
    multi = task.is_multi_label
    rows = []
    for p in probs:
        if multi:
            label: Any = [n for n, q in zip(label_names, p) if q >= threshold]
        else:
            label = label_names[int(np.argmax(p))]
        rows.append({"label": label, **{f"prob_{n}": float(q) for n, q in zip(label_names, p)}})
    return rows


def prompt_messages(row: dict[str, Any], source: str) -> list[dict[str, str]]:
    """A prompts-file row as chat messages: `messages` as given, or `prompt` as one user
    turn."""
    if isinstance(row.get("messages"), list):
        return row["messages"]
    if isinstance(row.get("prompt"), str):
        return [{"role": "user", "content": row["prompt"]}]
    raise ValueError(
        f"{source}: a prompts row needs a `prompt` string or a `messages` list of "
        f"{{role, content}}; got keys {sorted(row)}"
    )


class LabelPredictor:
    """Output columns of a classifier / regressor (text or image) for chunks of rows:
    `label` and `prob_<name>` per class, multi-label the labels over `threshold`, `score`."""

    def __init__(self, setup, params, source: str, threshold: float = 0.5):
        self.setup, self.params, self.source, self.threshold = setup, params, source, threshold

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        logits = model_outputs(self.setup, self.params, rows, self.source).logits
        task = self.setup.task
        return label_columns(task, task.label_names, logits, self.threshold)


class CompletionPredictor:
    """A causal LM's `completion` for each row's prompt (greedy or sampled as `generate.*`
    says); one Generator, so it compiles once per prompt bucket."""

    def __init__(self, setup, params, source: str):
        self.setup, self.params, self.source = setup, params, source
        self._generator = lm_samples.make_generator(
            setup.module, setup.tokenizer, setup.hf_config, setup.config.generate, PROMPT_BUCKETS
        )

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"completion": c} for c in self.completions(rows)]

    def completions(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """The generated reply to each row's prompt, decoded without special tokens."""
        tokenizer = self.setup.tokenizer
        prompts = [prompt_messages(row, self.source) for row in rows]
        token_ids = lm_samples.prompt_token_ids(tokenizer, prompts)
        batch = self.setup.config.generate.batch_size
        outputs = self._generator.generate(self.params, token_ids, batch)
        return [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]


def label_config(task) -> dict[str, Any]:
    """The exported config.json's head keys for a classifier: `num_labels`, `problem_type`,
    `id2label` / `label2id` (regression: one output named `score`)."""
    if task.is_regression:
        names: Sequence[str] = ("score",)
        problem_type = "regression"
    else:  # single_label_ or multi_label_classification (transformers then uses sigmoid)
        names, problem_type = task.label_names, task.problem_type
    return {"problem_type": problem_type, **class_names_config(names)}


def class_names_config(names: Sequence[str]) -> dict[str, Any]:
    """The exported config.json's `num_labels`, `id2label` and `label2id` for class `names`."""
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
    }


class EntityPredictor:
    """Token classification: the `entities` of each row's raw text (column
    `data.text_columns[0]`), as transformers' `pipeline("token-classification",
    aggregation_strategy="simple")` gives them: type, mean piece score, the words, and
    character offsets into the text."""

    def __init__(self, setup, params, source: str):
        self.setup, self.params, self.source = setup, params, source
        self.column = (tuple(setup.config.data.text_columns) or ("text",))[0]

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        setup, tokenizer = self.setup, self.setup.tokenizer
        texts = prediction_io.text_examples(rows, [self.column], self.source).text_a
        encoded = tokenizer(
            texts,
            truncation=True,
            max_length=setup.config.data.max_length,
            padding="max_length",
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
            return_token_type_ids=True,
        )
        ids = np.asarray(encoded["input_ids"], np.int32)
        mask = np.asarray(encoded["attention_mask"], np.int32)
        special = np.asarray(encoded["special_tokens_mask"]) | (mask == 0)
        probs = []
        for batch in setup.data.eval_batches(setup.data.raw_split(encoded)):
            out = jax.device_get(setup.predict_step(self.params, setup.put_batch(batch)))
            real = (np.asarray(out["weights"]) > 0).any(axis=1)  # the global batch's real rows
            probs += list(softmax(np.asarray(out["logits"])[real]))
        names = setup.task.label_names
        return [
            {
                "entities": entities.group_entities(
                    text,
                    entities.predicted_pieces(
                        ids[i], encoded["offset_mapping"][i], special[i], probs[i], names, tokenizer
                    ),
                    tokenizer,
                )
            }
            for i, text in enumerate(texts)
        ]


class TranslationPredictor:
    """Translation: the `translation` of each row's source text (column
    `data.source_column`), by the eval's generator (`setup.scorer.generator`: greedy, or
    beam search of `generate.num_beams`), batched as eval batches rows."""

    def __init__(self, setup, params, source: str):
        self.setup, self.params, self.source = setup, params, source
        self.column = setup.task.source_column
        self.generator = setup.scorer.generator

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        data = self.setup.data
        texts = prediction_io.text_examples(rows, [self.column], self.source).text_a
        where = [
            rows.where(i) if isinstance(rows, prediction_io.Rows) else "" for i in range(len(rows))
        ]
        split = data.encode(Pairs(texts, [""] * len(texts), where), "predict")
        order, batch_size = data.eval_order(split), self.setup.config.train.batch_size
        out = [""] * len(texts)
        for start, batch in zip(range(0, len(texts), batch_size), data.eval_batches(split)):
            device = self.setup.put_batch({k: batch[k] for k in ("input_ids", "attention_mask")})
            tokens = self.generator.generate(self.params, device)
            chosen = order[start : start + batch_size]  # the global batch's real rows
            for row, text in zip(chosen, self.generator.texts(tokens[: len(chosen)])):
                out[row] = text
        return [{"translation": text} for text in out]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Probabilities over the last axis, in float64 (no overflow for large logits)."""
    logits = np.asarray(logits, np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)
