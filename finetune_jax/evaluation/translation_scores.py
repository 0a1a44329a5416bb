"""Scores of translations: chrF and BLEU by sacrebleu, and how many keep their source's format
specifiers; the evaluator's scorer that translates every eval row and scores it.

  corpus_scores       hypotheses vs references (and their sources) -> chrF, BLEU, kept rates
  signatures          sacrebleu's signature of each score (what a reader needs to compare)
  format_specifiers   the printf-style / brace placeholders and newlines of a text, a multiset
  TranslationScorer   add(...) per eval batch, result() -> (metrics, records)

chrF (chrF2: character 6-grams, beta 2) and BLEU (13a tokenization, exponential smoothing) are
sacrebleu's defaults, on stripped texts, one reference per row; `signatures()` states them.
A software message's placeholders must survive translation: a hypothesis *preserves* its
source's format when both hold the same multiset of specifiers (`%s`, `%d`, `%-5.2f`, `%1$s`,
`%(name)s`, `%%`, `%<PRIu64>`, `{0}`, `{name}`, and newlines inside the text); order may change,
as translations reorder words. Texts are compared stripped, so leading and trailing newlines
(the caller's framing) do not count. `format_preserved` is the share of rows whose source holds
at least one specifier that keep them all; `placeholders_preserved` the same without newlines
(a tokenizer that turns newlines into spaces, as Marian's SentencePiece does, can never keep
them); `*_reference` the same rates of the human references, the ceiling imitation reaches.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

PRINTF = (
    r"%(?:\d+\$)?(?:\([^()\s]*\))?[-+#0']*(?:\*(?:\d+\$)?|\d+)?(?:\.(?:\*(?:\d+\$)?|\d+))?"
    r"(?:hh|ll|[hlLqjzt])?[diouxXeEfFgGaAcCsSpnm%]"
)
SPECIFIER = re.compile(rf"{PRINTF}|%<PRI\w+>|\{{[^{{}}\s]*\}}|\n")
SCORES = ("chrf", "bleu", "format_preserved", "placeholders_preserved")


def format_specifiers(text: str, newlines: bool = True) -> collections.Counter:
    """The multiset of format specifiers in stripped `text` (newlines among them unless
    `newlines` is False)."""
    found = SPECIFIER.findall(text.strip())
    return collections.Counter(s for s in found if newlines or s != "\n")


def preserved_rate(sources: Sequence[str], outputs: Sequence[str], newlines: bool = True) -> float:
    """Share of the rows whose source holds a specifier that keep the same multiset in their
    output; 1.0 when no source holds one."""
    kept = [
        format_specifiers(o, newlines) == wanted
        for s, o in zip(sources, outputs)
        if (wanted := format_specifiers(s, newlines))
    ]
    return float(np.mean(kept)) if kept else 1.0


def _metrics():
    import sacrebleu  # noqa: PLC0415 (only translation tasks score with it)

    return sacrebleu.metrics.CHRF(), sacrebleu.metrics.BLEU()


def corpus_scores(
    hypotheses: Sequence[str], references: Sequence[str], sources: Sequence[str]
) -> dict[str, float]:
    """chrF and BLEU (0-100) of stripped `hypotheses` against stripped `references`, and the
    format-kept rates of the hypotheses and of the references (module docstring)."""
    hypotheses = [h.strip() for h in hypotheses]
    references = [r.strip() for r in references]
    chrf, bleu = _metrics()
    return {
        "chrf": chrf.corpus_score(hypotheses, [references]).score,
        "bleu": bleu.corpus_score(hypotheses, [references]).score,
        "format_preserved": preserved_rate(sources, hypotheses),
        "placeholders_preserved": preserved_rate(sources, hypotheses, newlines=False),
        "format_preserved_reference": preserved_rate(sources, references),
        "placeholders_preserved_reference": preserved_rate(sources, references, newlines=False),
    }


def signatures() -> dict[str, str]:
    """sacrebleu's signature of the chrF and BLEU that `corpus_scores` computes."""
    chrf, bleu = _metrics()
    for metric in (chrf, bleu):  # a signature states the reference count: score once first
        metric.corpus_score(["a"], [["a"]])
    return {
        "chrf_signature": str(chrf.get_signature()),
        "bleu_signature": str(bleu.get_signature()),
    }


class TranslationScorer:
    """The evaluator's scorer for translation: every real row of each eval batch translated
    by `generator` (`seq2seq_generation.Seq2SeqGenerator`) and scored against the texts as
    written (`data.evaluated`: the split whose batches are out; no batch array holds texts),
    found by the rows' `row_ids`. Records {"source", "reference", "hypothesis",
    "format_preserved"} per row, in the split's order."""

    def __init__(self, generator, data):
        self.generator, self.data = generator, data
        self._rows: list[int] = []
        self._hypotheses: list[str] = []

    def add(self, params: Any, device_batch: dict[str, Any], out: dict[str, Any], keep) -> None:
        inputs = {k: device_batch[k] for k in ("input_ids", "attention_mask")}
        tokens = self.generator.generate(params, inputs)
        real = np.asarray(keep).any(axis=1)  # filler rows of the last batch train no token
        self._rows += np.asarray(out["row_ids"])[real].tolist()
        self._hypotheses += self.generator.texts(tokens[real])

    def result(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        order = np.argsort(self._rows, kind="stable")
        rows = [self._rows[i] for i in order]
        hypotheses = [self._hypotheses[i] for i in order]
        self._rows, self._hypotheses = [], []
        pairs = self.data.evaluated.pairs
        sources = [pairs.sources[r] for r in rows]
        references = [pairs.targets[r] for r in rows]
        metrics = {**corpus_scores(hypotheses, references, sources), "translated": len(rows)}
        records = [
            {
                "source": s,
                "reference": r,
                "hypothesis": h,
                "format_preserved": format_specifiers(h) == format_specifiers(s),
            }
            for s, r, h in zip(sources, references, hypotheses)
        ]
        return metrics, records
