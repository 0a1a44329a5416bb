"""Entity-level results of token classification: seqeval scores and pipeline-style groups.

`entity_scores` scores word tags as seqeval does by default (conlleval: an I-X after O or
after another type starts an entity). `group_entities` turns per-piece predictions into the
entity list that transformers' `pipeline("token-classification", aggregation_strategy=
"simple")` returns, so predictions written here read like the ones people know from HF.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from finetune_jax.data.ner_tags import check_tags, entity_types


def entity_scores(
    true_tags: Sequence[Sequence[str]],
    pred_tags: Sequence[Sequence[str]],
    types: Sequence[str],
) -> dict[str, float]:
    """Entity micro precision / recall / F1 and `f1_<type>` for every one of `types`.

    `types` (see token_tags.entity_types) fixes the keys, so every split and every eval
    reports the same names even when a type is absent. No entities at all gives 0.0.
    """
    # seqeval imports scikit-learn (~1.3 s): pay for it only when scoring, not to group.
    from seqeval.metrics import sequence_labeling  # noqa: PLC0415

    if len(true_tags) != len(pred_tags):
        raise ValueError(f"{len(true_tags)} true tag sequences but {len(pred_tags)} predicted")
    for row, (true, pred) in enumerate(zip(true_tags, pred_tags)):
        if len(true) != len(pred):
            raise ValueError(f"row {row}: {len(true)} true tags but {len(pred)} predicted")
        check_tags(true, f"row {row} (true tags)")
        check_tags(pred, f"row {row} (predicted tags)")
    true_tags, pred_tags = [list(t) for t in true_tags], [list(t) for t in pred_tags]
    found = {
        kind
        for tags in (true_tags, pred_tags)
        for kind, _, _ in sequence_labeling.get_entities(tags)
    }
    unknown = found - set(types)
    if unknown:
        raise ValueError(
            f"tags name entity types {sorted(unknown)} that are not among {tuple(types)}; "
            "pass the types of the model's label names (token_tags.entity_types)"
        )
    with warnings.catch_warnings():  # no entities: 0/0 is 0 here, not a warning per eval
        warnings.simplefilter("ignore")
        precision, recall, f1, _ = sequence_labeling.precision_recall_fscore_support(
            true_tags, pred_tags, average="micro", zero_division=0
        )
        _, _, f1_per_type, _ = sequence_labeling.precision_recall_fscore_support(
            true_tags, pred_tags, average=None, zero_division=0
        )
    scores = {"precision": float(precision), "recall": float(recall), "f1": float(f1)}
    by_type = dict(zip(sorted(found), f1_per_type))  # seqeval's order: sorted types seen
    scores.update({f"f1_{kind}": float(by_type.get(kind, 0.0)) for kind in types})
    return scores


class Piece(NamedTuple):
    """One non-special word piece of a text, with the model's top label for it."""

    label: str  # the argmax label name
    score: float  # its softmax probability
    start: int  # character offsets of the piece in the text
    end: int
    token: str  # the piece as the tokenizer spells it ("##ing"; the unk token for unknowns)


def predicted_pieces(
    input_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    special_tokens_mask: Sequence[int],
    probabilities: np.ndarray,
    label_names: Sequence[str],
    tokenizer,
) -> list[Piece]:
    """The pieces of one tokenized text (a fast tokenizer's offsets and special-token mask)
    with their argmax label and probability [L, C], in order, special tokens left out."""
    pieces = []
    for index, token_id in enumerate(input_ids):
        if special_tokens_mask[index]:
            continue
        best = int(np.argmax(probabilities[index]))
        start, end = (int(x) for x in offsets[index])
        token = tokenizer.convert_ids_to_tokens(int(token_id))
        pieces.append(
            Piece(label_names[best], float(probabilities[index][best]), start, end, token)
        )
    return pieces


def group_entities(
    text: str, pieces: Sequence[Piece], tokenizer, ignore_labels: Sequence[str] = ("O",)
) -> list[dict]:
    """Entities as transformers' token-classification pipeline with aggregation "simple".

    Adjacent pieces join one group while their types agree and the newer piece is not B-
    (a label without B-/I- counts as I-). Word boundaries play no part: a word whose pieces
    get different types is split. A group is {"entity_group": type, "score": mean piece score,
    "word": the pieces joined by `tokenizer.convert_tokens_to_string`, "start": first piece's
    start, "end": last piece's end}; groups of `ignore_labels` ("O") are left out.
    """
    groups: list[list[Piece]] = []
    for piece in pieces:
        begins, entity_type = _split_label(piece.label)
        if groups and not begins and entity_type == _split_label(groups[-1][-1].label)[1]:
            groups[-1].append(piece)
        else:
            groups.append([piece])
    entities = [_entity(text, group, tokenizer) for group in groups]
    return [entity for entity in entities if entity["entity_group"] not in ignore_labels]


def _split_label(label: str) -> tuple[bool, str]:
    """(starts an entity, type): "B-X" -> (True, "X"); "I-X" and a bare "X" -> (False, ...)."""
    if label.startswith(("B-", "I-")):
        return label.startswith("B-"), label[2:]
    return False, label


def _entity(text: str, group: list[Piece], tokenizer) -> dict:
    # The pipeline spells an unknown piece as its text, since "[UNK]" tells a reader nothing.
    tokens = [text[p.start : p.end] if p.token == tokenizer.unk_token else p.token for p in group]
    return {
        # The pipeline names a group after its first label's text after the first "-".
        "entity_group": group[0].label.split("-", 1)[-1],
        "score": float(np.nanmean(np.asarray([p.score for p in group], np.float32))),
        "word": tokenizer.convert_tokens_to_string(tokens),
        "start": group[0].start,
        "end": group[-1].end,
    }


class EntityScorer:
    """The evaluator's scorer for token classification: each sentence's word tags (the
    prediction at every word's first piece, `word_starts`) scored at the entity level
    (`entity_scores`); records {"tags", "predicted"} per sentence, in order."""

    def __init__(self, label_names: Sequence[str]):
        self.label_names = tuple(label_names)
        self.types = entity_types(self.label_names)
        self._true: list[list[str]] = []
        self._predicted: list[list[str]] = []

    def add(self, params, device_batch, out, keep) -> None:
        starts = np.asarray(out["word_starts"]) > 0
        labels, predictions = np.asarray(out["labels"]), np.asarray(out["predictions"])
        for row in np.flatnonzero(np.asarray(keep).any(axis=1)):
            words = starts[row]
            self._true.append([self.label_names[i] for i in labels[row][words]])
            self._predicted.append([self.label_names[i] for i in predictions[row][words]])

    def result(self) -> tuple[dict[str, float], list[dict[str, list[str]]]]:
        true, predicted = self._true, self._predicted
        self._true, self._predicted = [], []
        records = [{"tags": t, "predicted": p} for t, p in zip(true, predicted)]
        return entity_scores(true, predicted, self.types), records
