"""Token classification (NER) end to end on a tiny random BERT with MiniLM's tokenizer: the
token head against transformers', CoNLL / JSONL data with IOB1 and IOB2 tags, train -> eval
(entity F1 as seqeval scores it) -> predict (entities with character offsets) -> export that
transformers' BertForTokenClassification and its pipeline read as ours."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from finetune_jax import eval as eval_lib
from finetune_jax import predict as predict_lib
from finetune_jax import tasks
from finetune_jax import train as train_lib
from finetune_jax.data import ner_tags
from finetune_jax.evaluation import entities
from finetune_jax.export import export
from finetune_jax.hf import loading
from finetune_jax.models import bert
from finetune_jax.training import builder
from tests.helpers import SHARED_DATA, tiny_config

WNUT = SHARED_DATA / "ner_wnut16"


def ner_config(model_dir, **train):
    """The wnut16 task on the tiny model, 40 train / 24 validation sentences."""
    config = tiny_config(model_dir, WNUT, **train)
    config.data.task = "wnut16"
    config.data.max_length = 80
    config.data.max_train_rows = 40
    config.data.max_eval_rows = 24
    config.optim.lr = 1e-3
    return config


def test_token_head_matches_transformers(tiny_token_bert_dir):
    """Every tensor of a BertForTokenClassification file is read (no pooler in this head),
    and the per-token logits equal transformers'."""
    config, module, params = loading.load_pretrained(
        bert.FAMILY, str(tiny_token_bert_dir), "token_classification", num_labels=5
    )
    model = transformers.BertForTokenClassification.from_pretrained(tiny_token_bert_dir).eval()
    assert "pooler" not in params["bert"]
    # A fine-tune's head is new (initialised from the seed); give it the file's to compare.
    params["classifier"] = {
        "kernel": model.classifier.weight.detach().numpy().T,
        "bias": model.classifier.bias.detach().numpy(),
    }
    ids = np.random.default_rng(0).integers(1000, 30000, (2, 12)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 8:] = 0
    ours = np.asarray(module.apply({"params": params}, ids, mask))
    with torch.no_grad():
        theirs = model(input_ids=torch.tensor(ids).long(), attention_mask=torch.tensor(mask).long())
    np.testing.assert_allclose(ours, theirs.logits.numpy(), atol=1e-5)


def test_ner_train_eval_predict_export(tiny_bert_dir, tmp_path):
    config = ner_config(tiny_bert_dir, max_steps=6)
    workdir = tmp_path / "run"
    summary = train_lib.train(config, str(workdir))
    names = tuple(json.loads((workdir / "label_names.json").read_text()))
    gold = [t for _, t in ner_tags.read_conll(str(WNUT / "train.conll"))]
    assert names == ner_tags.label_names_from(gold) and names[0] == "O"
    assert summary["best_step"] in (3, 6)

    # eval: entity scores equal seqeval's on the words' tags, one record per sentence
    result = eval_lib.run_eval(config, str(workdir), "validation", which="latest")
    types = ner_tags.entity_types(names)
    assert {"loss", "token_accuracy", "precision", "recall", "f1"} <= set(result)
    assert {f"f1_{t}" for t in types} <= set(result)
    lines = (workdir / "entities_validation_step6.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 24
    setup = builder.build(config, workdir=str(workdir))
    rows = setup.data.load("validation")
    assert [r["tags"] for r in records] == rows.tags  # every word scored, in order
    expected = entities.entity_scores(rows.tags, [r["predicted"] for r in records], types)
    assert result["f1"] == pytest.approx(expected["f1"])

    # predict on raw sentences and export: transformers' pipeline finds the same entities
    texts = ["Empire State Building in New York with Justin Bieber", "lol @paulwalk see you"]
    source = tmp_path / "sentences.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    output = tmp_path / "entities.jsonl"
    predict_lib.predict(config, str(workdir), str(source), str(output), which="latest")
    ours = [json.loads(line)["entities"] for line in output.read_text().splitlines()]
    out = tmp_path / "hf"
    export(config, str(workdir), str(out), which="latest")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["architectures"] == ["BertForTokenClassification"]
    assert hf_config["id2label"] == {str(i): n for i, n in enumerate(names)}
    model = transformers.AutoModelForTokenClassification.from_pretrained(out).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    pipe = transformers.pipeline(
        "token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple"
    )
    for text, found in zip(texts, ours):
        theirs = pipe(text)
        assert [(e["entity_group"], e["start"], e["end"], e["word"]) for e in found] == [
            (e["entity_group"], e["start"], e["end"], e["word"]) for e in theirs
        ]
        np.testing.assert_allclose(
            [e["score"] for e in found], [float(e["score"]) for e in theirs], atol=1e-4
        )
    assert any(ours), "the untrained head should tag something in these sentences"

    # the exported logits equal ours
    _, params = setup.restore_params(str(workdir), "latest")
    batch = next(setup.data.eval_batches(rows))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    mine = np.asarray(setup.module.apply({"params": jax.device_get(params)}, **inputs))
    with torch.no_grad():
        theirs = model(**{k: torch.tensor(v).long() for k, v in inputs.items()}).logits.numpy()
    np.testing.assert_allclose(mine, theirs, atol=1e-4)


def test_jsonl_rows_with_iob1_tags_read_as_iob2(tiny_bert_dir, tmp_path):
    rows = [
        {"words": ["Ann", "met", "Bob", "Lee"], "ner": ["I-PER", "O", "I-PER", "I-PER"]},
        {"words": ["in", "Paris", "Texas"], "ner": ["O", "I-LOC", "B-LOC"]},
    ]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = ner_config(tiny_bert_dir)
    config.data.dir = str(tmp_path)
    config.data.max_train_rows = config.data.max_eval_rows = 0
    config.data.task = "token_classification"
    config.data.files.train = "train.jsonl"
    config.data.tokens_column, config.data.tags_column = "words", "ner"
    config.data.tag_scheme = "IOB1"
    task = tasks.task_for(config.data)
    assert task.format == "jsonl"
    data = tasks.kind_of(task).loader(config, task, _tokenizer(tiny_bert_dir), "")
    split = data.load("train")
    assert split.tags == [["B-PER", "O", "B-PER", "I-PER"], ["O", "B-LOC", "B-LOC"]]
    assert data.task.label_names == ("O", "B-LOC", "B-PER", "I-LOC", "I-PER")
    # first pieces carry the words' labels; special tokens and padding weigh nothing
    arrays = split.arrays
    assert arrays["weights"][0].sum() == 4 and arrays["word_starts"][0].sum() == 4
    ids = {n: i for i, n in enumerate(data.task.label_names)}
    starts = arrays["word_starts"][1] > 0
    assert list(arrays["labels"][1][starts]) == [ids["O"], ids["B-LOC"], ids["B-LOC"]]


def test_all_pieces_carry_the_inside_tag(tiny_bert_dir, tmp_path):
    (tmp_path / "train.conll").write_text("Bieberfever\tB-PER\nrocks\tO\n")
    config = ner_config(tiny_bert_dir)
    config.data.dir = str(tmp_path)
    config.data.max_train_rows = config.data.max_eval_rows = 0
    config.data.task = "token_classification"
    config.data.files.train = "train.conll"
    config.data.label_pieces = "all"
    task = tasks.task_for(config.data)
    data = tasks.kind_of(task).loader(config, task, _tokenizer(tiny_bert_dir), "")
    arrays = data.load("train").arrays
    word = arrays["word_ids"][0]
    pieces = np.flatnonzero(word == 0)
    assert len(pieces) > 1  # the test needs a word of several pieces
    names = data.task.label_names
    assert [names[i] for i in arrays["labels"][0][pieces]] == ["B-PER"] + ["I-PER"] * (
        len(pieces) - 1
    )
    assert arrays["weights"][0][pieces].tolist() == [1.0] * len(pieces)


def test_a_bad_tag_names_file_and_line(tiny_bert_dir, tmp_path):
    (tmp_path / "train.conll").write_text("Ann\tB-PER\nmet\tX-PER\n")
    config = ner_config(tiny_bert_dir)
    config.data.dir = str(tmp_path)
    config.data.max_train_rows = config.data.max_eval_rows = 0
    config.data.task = "token_classification"
    config.data.files.train = "train.conll"
    with pytest.raises(ValueError, match=r"train.conll:2.*'X-PER'"):
        builder.build(config)


def _tokenizer(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)
