"""The causal-LM SFT path end to end on a tiny Llama with SmolLM2's chat tokenizer: config ->
train (LoRA) -> held-out loss / perplexity -> checkpoint; and the held-out selection split
with a final evaluation on another split."""

from __future__ import annotations

import json
import math

import jax
import numpy as np
import pytest

from configs.sft.smollm2_gsm8k_lora import get_config as sft_config
from finetune_jax import tasks, tree_paths
from finetune_jax import train as train_lib
from finetune_jax.data import chat_loader, selection
from finetune_jax.eval import run_eval
from finetune_jax.evaluation import lm_samples
from finetune_jax.training import builder, checkpoints
from tests.helpers import SHARED_DATA, run_steps, tiny_config


def tiny_sft_config(model_dir, **overrides):
    """The GSM8K LoRA config on the tiny model: 48 train / 8 test conversations, 4 steps;
    the chunked LM loss over chunks of 96 of the 256-token rows (last one padded)."""
    config = sft_config()
    config.model.name = str(model_dir)
    config.model.lm_loss_chunk = 96
    # The unrolled layout, as these tests were written for (param paths per layer, `_place`
    # per tensor); tests/test_scan_layers.py covers the scanned one the config file uses.
    config.model.scan_layers = False
    config.model.remat = "none"
    config.data.dir = str(SHARED_DATA / "gsm8k")
    config.data.max_train_rows = 48
    config.data.max_eval_rows = 8
    config.data.max_length = 256
    config.optim.lr = 1e-2
    config.train.max_steps = 4
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.train.log_every = 1
    config.train.progress = False
    config.generate.num_samples = 2
    config.generate.max_new_tokens = 8
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def _flat(params):
    return dict(zip(tree_paths.param_paths(params), jax.tree.leaves(params)))


def test_lora_sft_trains_only_the_adapters(tiny_chat_llama_dir):
    exp, state, losses = run_steps(tiny_sft_config(tiny_chat_llama_dir), 3)
    before = _flat(jax.device_get(exp.pretrained_params()))
    after = _flat(jax.device_get(state.params))
    lora = [p for p in before if "/lora_" in p]
    assert lora and all("self_attn" in p or "mlp" in p for p in lora)
    for path, value in before.items():
        moved = not np.array_equal(value, after[path])
        assert moved == (path.endswith("lora_b") or path.endswith("lora_a")), path
    assert all(math.isfinite(x) for x in losses)


def test_sft_run_reports_heldout_loss_and_perplexity(tiny_chat_llama_dir, tmp_path):
    config = tiny_sft_config(tiny_chat_llama_dir)
    summary = train_lib.train(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for record in evals:
        assert record["perplexity"] == pytest.approx(math.exp(record["loss"]), rel=1e-9)
        assert 0.0 <= record["token_accuracy"] <= 1.0
        assert record["tokens"] > 8  # trained (assistant) tokens, not conversations
        assert "examples" not in record  # which a count of tokens is not
    assert summary["metric"] == "loss" and summary["best"] == min(r["loss"] for r in evals)
    # Selected on the train holdout, reported on test.
    final = summary["final"]
    assert final["split"] == "test" and final["step"] == summary["best_step"]
    # The lr is high for a tiny random model: training on GSM8K must lower GSM8K test loss.
    untuned = run_eval(config, str(tmp_path), "test", which="pretrained")
    assert final["loss"] < untuned["loss"]
    tuned = run_eval(config, str(tmp_path), "test", which="best")
    assert tuned["loss"] == pytest.approx(final["loss"], rel=1e-6)
    assert tuned["selected_on"] == "holdout"
    lines = (tmp_path / f"generations_test_step{tuned['step']}.jsonl").read_text().splitlines()
    samples = [json.loads(line) for line in lines]
    assert len(samples) == config.generate.num_samples == tuned["generations"]
    for sample in samples:
        assert sample["prompt"].rstrip().endswith("assistant")  # ChatML generation prompt
        assert sample["answer"] == lm_samples.final_answer(sample["reference"])
        assert sample["answer"] is not None and sample["answer"] in sample["reference"]
        assert 1 <= sample["output_tokens"] <= config.generate.max_new_tokens
    assert tuned["exact_match"] == np.mean([s["correct"] for s in samples])


def test_a_single_chat_file_is_the_train_split_only(tmp_path):
    # Reading one file as every split would evaluate on the training data.
    config = tiny_sft_config(tmp_path, **{"data.dir": str(SHARED_DATA / "gsm8k" / "train.jsonl")})
    data = chat_loader.ChatData(config, tasks.get_task("gsm8k"), tokenizer=None)
    assert len(data.conversations("train")) == 48
    for split in ("test", "validation"):
        with pytest.raises(ValueError, match=rf"single file.*not '{split}'"):
            data.conversations(split)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so 3 + 4 = 7\n#### 7", "7"),
        ("#### 1,234.", "1234"),
        ("#### $-5.50 dollars", "-5.5"),
        ("#### 1,000", "1000"),
        ("#### 3.250", "3.25"),
        ("#### 12.0", "12"),
        ("first #### 3 then corrected #### 4", "4"),
        ("the answer is 7", None),
        ("#### none", None),
    ],
)
def test_final_answer_extraction(text, expected):
    assert lm_samples.final_answer(text) == expected


def test_holdout_rows_are_disjoint_fixed_and_capped():
    train = selection.split_rows(100, "train", 20, 0, split_seed=0)
    held = selection.split_rows(100, "holdout", 20, 0, split_seed=0)
    assert len(held) == 20 and len(train) == 80
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(range(100))
    assert np.array_equal(held, selection.split_rows(100, "holdout", 20, 0, split_seed=0))
    assert not np.array_equal(held, selection.split_rows(100, "holdout", 20, 0, split_seed=1))
    capped = selection.split_rows(100, "train", 20, 30, split_seed=0)
    assert len(capped) == 30 and set(capped) <= set(train)
    assert selection.split_rows(100, "validation", 20, 0, split_seed=0) is None
    assert len(selection.split_rows(100, "validation", 0, 10, split_seed=0)) == 10
    with pytest.raises(ValueError, match="holdout_rows"):
        selection.split_rows(100, "holdout", 0, 0, split_seed=0)
    with pytest.raises(ValueError, match="leaves no training rows"):
        selection.split_rows(100, "train", 100, 0, split_seed=0)


def test_selection_on_holdout_then_final_eval_of_best_checkpoint(
    tiny_bert_dir, sst2_slice, tmp_path
):
    config = tiny_config(tiny_bert_dir, sst2_slice, final_split="validation")
    config.data.holdout_rows = 50
    config.data.eval_split = "holdout"
    summary = train_lib.train(config, str(tmp_path))
    final = summary["final"]
    assert final["split"] == "validation" and final["step"] == summary["best_step"]
    assert final["examples"] == 40  # the whole dev slice
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {r["examples"] for r in records if r["kind"] == "eval"} == {50}
    assert [r["accuracy"] for r in records if r["kind"] == "final"] == [final["accuracy"]]
    again = run_eval(config, str(tmp_path), "validation", which=str(final["step"]))
    assert again["accuracy"] == final["accuracy"] and again["step"] == final["step"]


def test_sft_resume_is_bitwise_identical(tiny_chat_llama_dir, tmp_path):
    config = tiny_sft_config(tiny_chat_llama_dir, **{"generate.num_samples": 0})
    train_lib.train(config, str(tmp_path / "straight"))
    train_lib.train(config, str(tmp_path / "resumed"), until_step=2)
    train_lib.train(config, str(tmp_path / "resumed"))
    states = []
    for run in ("straight", "resumed"):
        setup = builder.build(config)
        manager = checkpoints.make_manager(str(tmp_path / run), 2, None, read_only=True)
        states.append(
            jax.device_get(checkpoints.restore_latest(manager, setup.abstract_state())[0])
        )
        checkpoints.close(manager)
    assert int(states[0].step) == int(states[1].step) == 4
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        assert np.array_equal(x, y)
    losses = []
    for run in ("straight", "resumed"):
        records = [json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
        losses.append([r["loss"] for r in records if r["kind"] == "train"])
    assert losses[0] == losses[1] and len(losses[0]) == 4
