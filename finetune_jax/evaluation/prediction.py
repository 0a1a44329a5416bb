"""Predictions of a trained run on chunks of unlabeled rows, through the same batching and
jitted model apply as eval (`Setup.data.eval_batches`, `Setup.predict_step`).

`Predictor(rows)` returns one dict of output columns per row: for classification `label`
and `prob_<name>` per class; multi-label the labels with probability >= threshold (a list)
and the probabilities; regression `score`; causal LM `completion` (greedy or sampled as
`generate.*` says, via `evaluation/generation.py`). Padding rows never come back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from finetune_jax.data import prediction_io, text_batches
from finetune_jax.evaluation import generated_answers

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
    """Logits and pooled features of `rows` (a head task: classification, regression,
    multi-label or image classification), batched as eval batches them."""
    task, lengths, unknown = setup.task, None, None
    if task.kind == "image_classification":
        chunk = prediction_io.image_split(rows, setup.config.data.image_column, source)
    else:
        examples = prediction_io.text_examples(rows, task.text_columns, source)
        chunk = text_batches.tokenize(examples, setup.tokenizer, setup.config.data.max_length)
        lengths = chunk.lengths
        unk = setup.tokenizer.unk_token_id
        unknown = np.asarray([int(np.sum(ids == unk)) for ids in chunk.input_ids], np.int32)
    logits, features = [], []
    for batch in setup.data.eval_batches(chunk):
        out = jax.device_get(setup.predict_step(params, setup.put_batch(batch)))
        keep = np.asarray(out["weights"]) > 0  # the global batch's real rows
        logits.append(np.asarray(out["logits"])[keep])
        features.append(np.asarray(out["features"])[keep])
    return ChunkOutputs(np.concatenate(logits), np.concatenate(features), lengths, unknown)


def probabilities(task, logits: np.ndarray) -> np.ndarray:
    """Class probabilities [N, C] from logits: softmax, or per-class sigmoid for multi-label."""
    logits = logits.astype(np.float64)
    if getattr(task, "is_multi_label", False):
        return 1.0 / (1.0 + np.exp(-logits))
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def label_columns(
    task, label_names: Sequence[str], logits: np.ndarray, threshold: float = 0.5
) -> list[dict[str, Any]]:
    """Output columns per row: `score` (regression); `label` + `prob_<name>` per class."""
    if task.is_regression:
        return [{"score": float(v)} for v in logits[:, 0]]
    probs = probabilities(task, logits)
    multi = getattr(task, "is_multi_label", False)
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


class Predictor:
    """Output columns for chunks of rows from one run's params (see module docstring)."""

    def __init__(
        self, setup, params, label_names: Sequence[str] | None, source: str, threshold=0.5
    ):
        self.setup, self.params, self.source = setup, params, source
        self.label_names, self.threshold = label_names, threshold
        self._generator = None
        if setup.task.kind == "causal_lm":  # one Generator: it compiles once per bucket
            self._generator = generated_answers.make_generator(
                setup.module,
                setup.tokenizer,
                setup.hf_config,
                setup.config.generate,
                PROMPT_BUCKETS,
            )
        elif setup.predict_step is None:
            raise ValueError(
                f"predict does not support task kind {setup.task.kind!r} "
                "(classification, regression, multi-label, image classification, causal LM)"
            )

    def __call__(self, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        if self._generator is not None:
            return [{"completion": c} for c in self.completions(rows)]
        logits = model_outputs(self.setup, self.params, rows, self.source).logits
        return label_columns(self.setup.task, self.label_names, logits, self.threshold)

    def completions(self, rows: Sequence[dict[str, Any]]) -> list[str]:
        """The generated reply to each row's prompt, decoded without special tokens."""
        tokenizer = self.setup.tokenizer
        prompts = [prompt_messages(row, self.source) for row in rows]
        token_ids = generated_answers.prompt_token_ids(tokenizer, prompts)
        batch = self.setup.config.generate.batch_size
        outputs = self._generator.generate(self.params, token_ids, batch)
        return [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]
