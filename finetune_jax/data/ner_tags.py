"""Token-tag data for token classification (NER): CoNLL files, tag schemes, word-piece labels.

Tags are kept per word, in IOB2 (BIO) form after `to_iob2`. A model sees word pieces, so
`align_to_pieces` / `encode_words` put each word's label on its pieces:
  input_ids, attention_mask, token_type_ids  int32 [N, L], right-padded with the pad id
  labels                                     int32 [N, L], the label id of the piece's word
  weights                                    float32 [N, L], 1 where the loss counts the piece
  word_ids                                   int32 [N, L], the piece's word index, -1 for none
Label ids follow `label_names_from`: "O" is id 0, so the label of special and padding pieces
is "O" (with weight 0).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

SCHEMES = ("IOB1", "IOB2", "BIO")  # BIO is another name for IOB2
OUTSIDE = "O"
NO_WORD = -1  # word_ids entry of special and padding pieces


def read_conll(path: str) -> list[tuple[list[str], list[str]]]:
    """(tokens, tags) of every sentence of a CoNLL-style file.

    One token per line: `token<TAB>tag`, or whitespace-separated columns with the token first
    and the tag last (columns in between, e.g. POS and chunk tags, are ignored). A blank line
    ends a sentence; `-DOCSTART-` lines are skipped. Tags are checked (`check_tags`) but not
    converted: pass them through `to_iob2` with the file's scheme.
    """
    sentences: list[tuple[list[str], list[str]]] = []
    tokens: list[str] = []
    tags: list[str] = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                if tokens:
                    sentences.append((tokens, tags))
                tokens, tags = [], []
                continue
            if line.startswith("-DOCSTART-"):
                continue
            # A tab-separated file may hold tokens with spaces; split on tabs when there are any.
            columns = line.split("\t") if "\t" in line else line.split()
            where = f"{path}:{number}"
            if len(columns) < 2 or not columns[0].strip():
                raise ValueError(
                    f"{where}: expected a token and its tag separated by a tab (or other "
                    f"whitespace), token first and tag last; got {line!r}"
                )
            tag = columns[-1].strip()
            check_tags([tag], where)
            tokens.append(columns[0].strip())
            tags.append(tag)
    if tokens:  # the last sentence needs no blank line after it
        sentences.append((tokens, tags))
    return sentences


def check_tags(tags: Sequence[str], where: str) -> None:
    """Raises ValueError naming `where` (file:line, row) if a tag is not O, B-<type> or I-<type>.

    An I-<type> after O or after another type is allowed: IOB1 starts entities that way, and
    seqeval's default scoring reads it as the start of an entity in IOB2 too.
    """
    for tag in tags:
        if tag != OUTSIDE and not (tag[:2] in ("B-", "I-") and len(tag) > 2):
            raise ValueError(
                f"{where}: tag {tag!r} is not {OUTSIDE!r}, 'B-<type>' or 'I-<type>'; token tags "
                f"must use one of the schemes {SCHEMES} (convert IOBES or bare types first)"
            )


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
    """Tags in IOB2 (every entity starts with B-), from tags in `scheme` (one of SCHEMES).

    In IOB1 an entity starts with I- and B- only separates two adjacent entities of one type,
    so an I- that does not continue an entity of its own type becomes B-. IOB2 / BIO tags are
    returned as given.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown tag scheme {scheme!r}; expected one of {SCHEMES}")
    if scheme != "IOB1":
        return list(tags)
    converted = []
    previous = OUTSIDE
    for tag in tags:
        if tag.startswith("I-") and (previous == OUTSIDE or previous[2:] != tag[2:]):
            converted.append("B-" + tag[2:])
        else:
            converted.append(tag)
        previous = tag
    return converted


def label_names_from(tag_sequences: Iterable[Sequence[str]]) -> tuple[str, ...]:
    """Label names, id order: "O" first, then B- and I- of every entity type seen, sorted.

    Each type gets both its B- and its I- tag even if a split shows only one of them, so that
    label ids do not depend on whether some split happens to hold a multi-word entity, and
    every B- tag has the I- tag that `continuation_ids` needs.
    """
    types = set()
    for row, tags in enumerate(tag_sequences):
        check_tags(tags, f"tag sequence {row}")
        types.update(tag[2:] for tag in tags if tag != OUTSIDE)
    return (OUTSIDE, *sorted(f"{prefix}-{kind}" for kind in types for prefix in "BI"))


def entity_types(label_names: Sequence[str]) -> tuple[str, ...]:
    """The sorted entity types that the B-/I- label names mention."""
    check_tags(label_names, "label names")
    return tuple(sorted({name[2:] for name in label_names if name != OUTSIDE}))


def continuation_ids(label_names: Sequence[str]) -> np.ndarray:
    """int32 [C]: for each label id, the id that a word's later pieces get (B-X -> I-X, else
    itself), for `align_to_pieces(..., label_all_pieces=True)`."""
    index = {name: i for i, name in enumerate(label_names)}
    ids = np.arange(len(label_names), dtype=np.int32)
    for i, name in enumerate(label_names):
        if name.startswith("B-"):
            inside = "I-" + name[2:]
            if inside not in index:
                raise ValueError(
                    f"label {name!r} has no {inside!r} among the label names {tuple(label_names)}; "
                    "build them with label_names_from, which adds both tags of every type"
                )
            ids[i] = index[inside]
    return ids


def align_to_pieces(
    word_ids: Sequence[int | None],
    word_label_ids: Sequence[int],
    label_all_pieces: bool,
    continuation: Sequence[int] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels int32 [P], weights float32 [P]) for the P pieces of one sentence.

    `word_ids[p]` is piece p's word index (None for special tokens: label 0, weight 0). The
    first piece of a word carries the word's label with weight 1. Later pieces carry the
    word's label with weight 0, or, with `label_all_pieces`, `continuation[label]` (B-X ->
    I-X, see `continuation_ids`) with weight 1.
    """
    if label_all_pieces and continuation is None:
        raise ValueError("label_all_pieces=True needs `continuation` (see continuation_ids)")
    labels = np.zeros(len(word_ids), np.int32)
    weights = np.zeros(len(word_ids), np.float32)
    previous = None
    for piece, word in enumerate(word_ids):
        if word is None:
            previous = None
            continue
        if not 0 <= word < len(word_label_ids):
            raise ValueError(
                f"piece {piece} names word {word}, but there are {len(word_label_ids)} word labels"
            )
        label = int(word_label_ids[word])
        if word != previous:
            labels[piece], weights[piece] = label, 1.0
        elif label_all_pieces:
            labels[piece], weights[piece] = continuation[label], 1.0
        else:
            labels[piece] = label
        previous = word
    return labels, weights


class EncodedWords(NamedTuple):
    """Padded arrays of `encode_words`, plus the words whose label no piece carries."""

    arrays: dict[str, np.ndarray]
    words_cut: int  # words dropped whole by truncation to max_length
    words_without_pieces: int  # words the tokenizer turns into nothing (e.g. a lone U+200B)


def encode_words(
    tokenizer,
    sentences: Sequence[Sequence[str]],
    tag_ids: Sequence[Sequence[int]] | None,
    max_length: int,
    label_all_pieces: bool,
    continuation: Sequence[int] | np.ndarray | None = None,
) -> EncodedWords:
    """Tokenizes pre-split sentences with a fast HF tokenizer and labels their pieces.

    Sequences are truncated to `max_length` pieces (special tokens included) and right-padded
    to exactly `max_length`. Without `tag_ids` (prediction) labels are 0 and weights mark the
    first piece of each word, the pieces whose predictions become word predictions.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("token classification needs a fast tokenizer (word_ids per piece)")
    if tag_ids is not None and len(tag_ids) != len(sentences):
        raise ValueError(f"{len(sentences)} sentences but {len(tag_ids)} tag sequences")
    encoding = tokenizer(
        [list(words) for words in sentences],
        is_split_into_words=True,
        truncation=True,
        max_length=max_length,
        padding=False,
        return_token_type_ids=True,
        return_attention_mask=False,
    )
    shape = (len(sentences), max_length)
    arrays = {
        "input_ids": np.full(shape, tokenizer.pad_token_id, np.int32),
        "attention_mask": np.zeros(shape, np.int32),
        "token_type_ids": np.zeros(shape, np.int32),
        "labels": np.zeros(shape, np.int32),
        "weights": np.zeros(shape, np.float32),
        "word_ids": np.full(shape, NO_WORD, np.int32),
    }
    words_cut = words_without_pieces = 0
    for row, words in enumerate(sentences):
        word_ids = encoding.word_ids(row)
        length = len(word_ids)
        arrays["input_ids"][row, :length] = encoding["input_ids"][row]
        arrays["attention_mask"][row, :length] = 1
        arrays["token_type_ids"][row, :length] = encoding["token_type_ids"][row]
        arrays["word_ids"][row, :length] = [NO_WORD if w is None else w for w in word_ids]
        if tag_ids is not None:
            if len(tag_ids[row]) != len(words):
                raise ValueError(f"row {row}: {len(words)} words but {len(tag_ids[row])} tags")
            labels, weights = align_to_pieces(
                word_ids, tag_ids[row], label_all_pieces, continuation
            )
        else:
            labels, weights = align_to_pieces(word_ids, [0] * len(words), False)
        arrays["labels"][row, :length], arrays["weights"][row, :length] = labels, weights
        kept = {w for w in word_ids if w is not None}
        cut = _overflowing_words(encoding.encodings[row]) - kept
        words_cut += len(cut)
        words_without_pieces += len(words) - len(kept) - len(cut)
    return EncodedWords(arrays, words_cut, words_without_pieces)


def _overflowing_words(encoding) -> set[int]:
    """Word indices in the pieces that truncation cut off (a `tokenizers.Encoding`)."""
    return {w for part in encoding.overflowing for w in part.word_ids if w is not None}


def word_predictions(
    word_ids: np.ndarray, piece_predictions: np.ndarray, num_words: int, fill: int = 0
) -> np.ndarray:
    """int [num_words]: each word's prediction, read at its first piece; `fill` ("O") for
    words without pieces (cut by truncation), so every gold word is scored."""
    predictions = np.full(num_words, fill, dtype=np.asarray(piece_predictions).dtype)
    word_ids = np.asarray(word_ids)
    pieces = np.flatnonzero(word_ids >= 0)
    if pieces.size and word_ids[pieces].max() >= num_words:
        raise ValueError(
            f"word_ids name word {word_ids[pieces].max()} of a {num_words}-word sentence"
        )
    # The first piece of each word: its word id differs from the previous piece's.
    first = pieces[np.r_[True, word_ids[pieces][1:] != word_ids[pieces][:-1]]]
    predictions[word_ids[first]] = np.asarray(piece_predictions)[first]
    return predictions
