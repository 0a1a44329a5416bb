"""Word and character error rates of transcripts, after a stated text normalisation.

Normalisation (both sides, before scoring): lower-case, then keep only the words made of
letters and digits (an apostrophe inside a word is kept: "what's"); every other character
(punctuation, symbols) separates words and is dropped. Numbers are not spelled out, so "45"
for "forty five" counts as errors. Rates are corpus-level: total edits (substitutions,
deletions, insertions; `jiwer`'s Levenshtein alignment) over total reference words
(characters for CER, counting the single spaces between words).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jiwer

_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)*")


def normalize(text: str) -> str:
    """Lower-cased words of letters / digits joined by single spaces (see the docstring)."""
    return " ".join(_WORD.findall(text.lower()))


def error_counts(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, int]:
    """Word and character edits and reference lengths, after `normalize`."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    counts = {"word_edits": 0, "words": 0, "char_edits": 0, "chars": 0}
    pairs = []
    for reference, hypothesis in zip(references, hypotheses):
        reference, hypothesis = normalize(reference), normalize(hypothesis)
        if reference:
            pairs.append((reference, hypothesis))
        else:  # jiwer rejects an empty reference: every hypothesis word is an insertion
            counts["word_edits"] += len(hypothesis.split())
            counts["char_edits"] += len(hypothesis)
    if pairs:
        refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
        words, chars = jiwer.process_words(refs, hyps), jiwer.process_characters(refs, hyps)
        for key, out in (("word", words), ("char", chars)):
            counts[f"{key}_edits"] += out.substitutions + out.deletions + out.insertions
            counts[f"{key}s"] += out.hits + out.substitutions + out.deletions
    return counts


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """{"wer", "cer"}: corpus-level error rates (0 when there is nothing to score)."""
    counts = error_counts(references, hypotheses)
    return {
        "wer": counts["word_edits"] / max(counts["words"], 1),
        "cer": counts["char_edits"] / max(counts["chars"], 1),
    }
