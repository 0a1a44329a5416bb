"""Your own data end to end: a 3-class CSV with string labels trains, evaluates and exports
as a model `transformers.pipeline` names the classes of; a multi-label JSONL trains with the
sigmoid loss and exports with transformers' multi-label problem type."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from finetune_jax import eval as eval_lib
from finetune_jax.export import export, write_hf_model
from finetune_jax.training import builder
from finetune_jax.training.loop import train
from tests.helpers import tiny_config

WORDS = {  # a class per topic; rows are short sentences of its words
    "billing": ["invoice", "refund", "charged", "payment", "receipt", "price"],
    "shipping": ["parcel", "delivery", "courier", "tracking", "address", "package"],
    "technical": ["crash", "router", "login", "error", "update", "screen"],
}


def _write_csv(path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    names = sorted(WORDS)
    lines = ["text,label"]
    for i in range(rows):
        label = names[i % 3]
        words = rng.choice(WORDS[label], 3, replace=False)
        lines.append(f'"my {words[0]}, the {words[1]} and a {words[2]}",{label}')
    path.write_text("\n".join(lines) + "\n")


def _own_config(model_dir, data_dir, task="text_classification", **files):
    config = tiny_config(model_dir, data_dir, max_steps=2, eval_every=2, checkpoint_every=2)
    config.data.task = task
    config.data.max_length, config.data.buckets = 16, (16,)  # one compiled shape
    for split, name in files.items():
        config.data.files[split] = name
    return config


def test_csv_with_string_labels_trains_evaluates_exports_and_pipeline_names_them(
    tiny_bert_dir, tmp_path, capsys
):
    _write_csv(tmp_path / "train.csv", 24, seed=0)
    _write_csv(tmp_path / "validation.csv", 9, seed=1)
    config = _own_config(tiny_bert_dir, tmp_path, train="train.csv", validation="validation.csv")
    workdir, out = tmp_path / "run", tmp_path / "hf"
    train(config, str(workdir))
    assert "class ids: 0=billing, 1=shipping, 2=technical" in capsys.readouterr().out
    names = json.loads((workdir / "label_names.json").read_text())
    assert names == ["billing", "shipping", "technical"]
    # The saved names, not a fresh inference, fix the ids: a changed train file cannot shift them.
    _write_csv(tmp_path / "train.csv", 24, seed=2)
    (tmp_path / "train.csv").write_text(
        (tmp_path / "train.csv").read_text().replace(",billing", ",aardvark")
    )
    result = eval_lib.run_eval(config, str(workdir), "validation", "latest")
    assert result["examples"] == 9 and set(result) >= {"accuracy", "macro_f1"}
    export(config, str(workdir), str(out), which="latest")
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["id2label"] == {"0": "billing", "1": "shipping", "2": "technical"}
    assert hf_config["problem_type"] == "single_label_classification"

    text = "my refund, the invoice and a receipt"
    pipe = transformers.pipeline("text-classification", model=str(out), top_k=None)
    theirs = {r["label"]: r["score"] for r in pipe([text])[0]}
    assert set(theirs) == set(names)
    setup = builder.build(config, workdir=str(workdir))
    _, params = setup.restore_params(str(workdir), "latest")
    encoded = setup.tokenizer([text], return_tensors="np", return_token_type_ids=True)
    inputs = {
        k: encoded[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")
    }
    logits = np.asarray(setup.module.apply({"params": jax.device_get(params)}, **inputs))[0]
    ours = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    for i, name in enumerate(names):
        assert theirs[name] == pytest.approx(float(ours[i]), abs=1e-5)


def test_multi_label_jsonl_exports_a_multi_label_model_with_transformers_loss(
    tiny_bert_dir, tmp_path
):
    rng = np.random.default_rng(0)
    for split, rows in (("train", 16), ("validation", 8)):
        records = []
        for _ in range(rows):
            labels = [n for n in sorted(WORDS) if rng.random() < 0.5]
            words = [w for n in labels for w in WORDS[n][:2]] or ["hello"]
            records.append({"text": " ".join(words), "labels": labels})
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = _own_config(
        tiny_bert_dir, tmp_path, "multi_label", train="train.jsonl", validation="validation.jsonl"
    )
    config.model.head_bias_init = "prior"  # each class's log-odds: a non-trivial head
    setup = builder.build(config)
    assert setup.task.label_names == tuple(sorted(WORDS))
    params = setup.pretrained_params()
    out = write_hf_model(setup, params, str(tmp_path / "hf"))
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["problem_type"] == "multi_label_classification"
    assert list(hf_config["id2label"].values()) == sorted(WORDS)
    # Our multi-hot batches and loss give transformers' own BCE loss for the exported model.
    batch = next(setup.data.eval_batches(setup.data.load("validation")))
    assert batch["labels"].shape == (8, 3) and batch["labels"].dtype == np.float32
    ours = jax.device_get(setup.eval_step(params, setup.put_batch(batch)))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out).eval()
    ids = ("input_ids", "attention_mask", "token_type_ids")
    with torch.no_grad():
        theirs = model(
            **{k: torch.tensor(batch[k]).long() for k in ids}, labels=torch.tensor(batch["labels"])
        )
    assert float(ours["loss_sum"]) / float(ours["weight_sum"]) == pytest.approx(
        theirs.loss.item(), rel=1e-4
    )
    np.testing.assert_array_equal(ours["predictions"], (theirs.logits.numpy() > 0).astype(int))


def test_a_failed_start_leaves_nothing_and_a_run_without_checkpoint_names_classes_afresh(
    tiny_bert_dir, tmp_path
):
    """A typo'd label and batch_size=0, or a misspelled validation file (read after the
    train split): the start fails before writing to the workdir, so the fixed rerun trains on
    the fixed data's classes, not the typo's phantom class; and class names saved by a start
    that reached no checkpoint (an earlier version's) are replaced by the data's."""
    _write_csv(tmp_path / "train.csv", 24, seed=0)
    _write_csv(tmp_path / "validation.csv", 9, seed=1)
    good = (tmp_path / "train.csv").read_text()
    (tmp_path / "train.csv").write_text(good.replace(",billing\n", ",bliling\n", 1))
    config = _own_config(tiny_bert_dir, tmp_path, train="train.csv", validation="validation.csv")
    config.train.batch_size = 0
    workdir = tmp_path / "run"
    with pytest.raises(ValueError, match="batch_size"):
        train(config, str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir())
    config.train.batch_size = 8
    config.data.files.validation = "validaton.csv"
    with pytest.raises((ValueError, OSError), match="validaton.csv"):
        train(config, str(workdir))
    assert not workdir.exists() or not any(workdir.iterdir())
    config.data.files.validation = "validation.csv"

    (tmp_path / "train.csv").write_text(good)
    workdir.mkdir(exist_ok=True)
    (workdir / "label_names.json").write_text(json.dumps(["billing", "bliling", "shipping"]))
    train(config, str(workdir))
    assert json.loads((workdir / "label_names.json").read_text()) == sorted(WORDS)
