"""`predict`: streamed predictions on unlabeled rows from a trained run's own config, equal to
what eval's model apply computes; image folders; causal-LM completions; safe output files."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from finetune_jax import train as train_lib
from finetune_jax.data import chat_batches, image_preprocess
from finetune_jax.data.text_sources import DataError
from finetune_jax.evaluation import lm_samples
from finetune_jax.evaluation.lm_generation import Generator, SamplingConfig
from finetune_jax.evaluation.prediction import probabilities
from finetune_jax.predict import predict
from finetune_jax.training import builder, run_config
from tests.helpers import REPO, SHARED_DATA
from tests.test_image_train import image_config, tiny_dinov2_dir  # noqa: F401, F811
from tests.test_sft_train import tiny_sft_config


def _dev_rows(count):
    lines = (SHARED_DATA / "glue" / "sst2" / "dev.tsv").read_text().splitlines()[1 : count + 1]
    return [line.split("\t")[0] for line in lines]


def _logits(setup, params, sentences):
    """Logits of the model apply eval uses on one batch padded to max_length (no batching
    or bucketing shared with predict)."""
    length = setup.config.data.max_length
    ids = setup.tokenizer(sentences, truncation=True, max_length=length, padding="max_length")
    inputs = {k: np.asarray(ids[k], np.int32) for k in ("input_ids", "attention_mask")}
    return np.asarray(jax.jit(setup.module.apply)({"params": params}, **inputs))


def test_predict_passes_columns_through_and_matches_the_models_probabilities(
    tiny_bert_run, tmp_path
):
    workdir, _ = tiny_bert_run
    sentences = _dev_rows(13)  # 13 rows: the second batch of 8 is padded
    source = tmp_path / "new.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentence", "note"])
        writer.writerows([i, s, f"n{i}"] for i, s in enumerate(sentences))
    config = run_config.saved_config(workdir)  # what predict reads without --config
    summary = predict(config, str(workdir), str(source), str(tmp_path / "out.csv"))
    assert summary["rows"] == 13 and summary["rows_per_second"] > 0
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "sentence", "note", "label", "prob_negative", "prob_positive"]
    assert [r["sentence"] for r in rows] == sentences
    assert [r["note"] for r in rows] == [f"n{i}" for i in range(13)]

    setup = builder.build(config)
    _, params = setup.restore_params(str(workdir))
    expected = probabilities(setup.task, _logits(setup, jax.device_get(params), sentences))
    got = np.asarray([[float(r["prob_negative"]), float(r["prob_positive"])] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    names = np.asarray(["negative", "positive"])
    assert [r["label"] for r in rows] == list(names[expected.argmax(axis=1)])


def test_predict_jsonl_keeps_a_users_label_column_and_never_leaves_half_files(
    tiny_bert_run, tmp_path
):
    workdir, config = tiny_bert_run
    source = tmp_path / "new.jsonl"
    rows = [{"sentence": s, "label": "gold"} for s in _dev_rows(3)]
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out.jsonl"
    predict(config, str(workdir), str(source), str(out))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["label"] for r in written] == ["gold"] * 3  # the input's, untouched
    assert all(r["predicted_label"] in ("negative", "positive") for r in written)

    with pytest.raises(FileExistsError, match="--overwrite"):
        predict(config, str(workdir), str(source), str(out))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "no sentence column"}) + "\n")
    with pytest.raises(DataError, match=r"no column\(s\) \['sentence'\]"):
        predict(config, str(workdir), str(bad), str(out), overwrite=True)
    assert [json.loads(line) for line in out.read_text().splitlines()] == written  # kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "new.jsonl", "out.jsonl"]


def test_cli_reads_the_saved_config_and_names_a_mismatched_key(tiny_bert_run, tmp_path):
    workdir, _ = tiny_bert_run
    source = tmp_path / "new.tsv"
    source.write_text("sentence\n" + "".join(s + "\n" for s in _dev_rows(2)))
    command = [sys.executable, "-m", "finetune_jax.predict", f"--workdir={workdir}"]
    command += [f"--input={source}", f"--output={tmp_path / 'out.csv'}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["rows"] == 2
    mismatch = [*command[:-1], f"--output={tmp_path / 'x.csv'}", "--config.data.max_length=48"]
    done = subprocess.run(mismatch, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 2
    assert "error: " in done.stderr and "data.max_length: run has 32, given 48" in done.stderr
    assert not (tmp_path / "x.csv").exists()


def test_predict_on_an_image_folder(tiny_dinov2_dir, tmp_path):  # noqa: F811
    workdir, folder = tmp_path / "run", tmp_path / "images"
    config = image_config(tiny_dinov2_dir, max_steps=3)
    train_lib.train(config, str(workdir))
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (28, 28), np.uint8)) for _ in range(5)]
    for i, image in enumerate(images):
        image.save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    predict(config, str(workdir), str(folder), str(tmp_path / "out.csv"))
    with open(tmp_path / "out.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    setup = builder.build(config)
    names = setup.task.label_names
    assert list(rows[0]) == ["path", "label", *(f"prob_{n}" for n in names)]
    assert [r["path"] for r in rows] == [str(folder / f"{i}.png") for i in range(5)]
    _, params = setup.restore_params(str(workdir))
    rgb = [image.convert("RGB") for image in images]
    pixels = image_preprocess.pixel_values(setup.tokenizer, rgb)
    logits = setup.module.apply({"params": jax.device_get(params)}, pixels)
    got = np.asarray([[float(r[f"prob_{n}"]) for n in names] for r in rows])
    np.testing.assert_allclose(got, probabilities(setup.task, np.asarray(logits)), atol=1e-5)


def test_causal_lm_completions_are_generations_greedy_output(tiny_chat_llama_dir, tmp_path):
    workdir = tmp_path / "run"
    one_step = {"train.max_steps": 1, "train.eval_every": 1, "train.checkpoint_every": 1}
    config = tiny_sft_config(tiny_chat_llama_dir, **one_step, **{"train.final_split": ""})
    train_lib.train(config, str(workdir))
    prompts = [
        {"prompt": "What is 2 + 3?", "id": 1},
        {"messages": [{"role": "user", "content": "Name a colour."}], "id": 2},
        {"prompt": "Count to three.", "id": 3},
    ]
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    predict(config, str(workdir), str(source), str(tmp_path / "out.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [1, 2, 3] and rows[1]["messages"] == prompts[1]["messages"]

    setup = builder.build(config)
    _, params = setup.restore_params(str(workdir))
    tokenizer = setup.tokenizer
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in prompts[::2]]
    conversations.insert(1, prompts[1]["messages"])
    ids = lm_samples.prompt_token_ids(tokenizer, conversations)
    eos = lm_samples.eos_ids(tokenizer, setup.hf_config)
    sampling = SamplingConfig(max_new_tokens=config.generate.max_new_tokens)
    generator = Generator(setup.module, eos, chat_batches.pad_token_id(tokenizer), sampling)
    expected = [
        tokenizer.decode(out, skip_special_tokens=True)
        for out in generator.generate(params, ids, batch_size=1)
    ]
    assert [r["completion"] for r in rows] == expected
