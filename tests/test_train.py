"""End-to-end contracts of the training loop on a tiny random BERT and a slice of SST-2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from finetune_jax.config import base_config
from finetune_jax.eval import run_eval
from finetune_jax.evaluation.metrics import metric_mode
from finetune_jax.hf import model_files
from finetune_jax.train import train
from finetune_jax.training import builder
from tests.helpers import REPO, SHARED_DATA, final_state, tiny_config, train_losses

SST2 = SHARED_DATA / "glue" / "sst2"


def test_frozen_leaves_unchanged_trainable_changed(tiny_bert_dir, sst2_slice):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.optim.preset = "linear_probe"
    exp = builder.build(config)
    state = exp.initial_state()
    batches = exp.data.train_batches()
    for _ in range(3):
        state, _ = exp.train_step(state, exp.put_batch(next(batches)))
    after = jax.device_get(state.params)
    for before, now, trainable in zip(
        jax.tree.leaves(exp.pretrained_params()),
        jax.tree.leaves(after),
        jax.tree.leaves(exp.groups.trainable),
    ):
        if trainable:
            assert not np.array_equal(before, now)
        else:
            assert np.array_equal(before, now)  # bitwise


def test_resumed_run_is_bitwise_identical(tiny_bert_dir, sst2_slice, tmp_path, monkeypatch):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    train(config, str(tmp_path / "straight"))
    train(config, str(tmp_path / "resumed"), until_step=3)
    assert final_state(config, tmp_path / "resumed").step == 3

    def no_weights(model_ref):
        raise AssertionError(f"a resumed run read the pretrained weights of {model_ref}")

    # Resuming takes shapes from eval_shape and values from the checkpoint alone.
    monkeypatch.setattr(model_files, "open_tensors", no_weights)
    train(config, str(tmp_path / "resumed"))
    a, b = final_state(config, tmp_path / "straight"), final_state(config, tmp_path / "resumed")
    assert int(a.step) == int(b.step) == 6
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(x, y)
    assert train_losses(tmp_path / "straight") == train_losses(tmp_path / "resumed")


def test_run_writes_logs_and_eval_script_reproduces_metric(tiny_bert_dir, sst2_slice, tmp_path):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    summary = train(config, str(tmp_path))
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (tmp_path / name).exists(), name
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "tensorboard"))
    assert 1 <= summary["compiled_train_shapes"] <= len(config.data.buckets)
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [3, 6]
    result = run_eval(config, str(tmp_path), "validation", which=str(summary["best_step"]))
    best = next(e for e in evals if e["step"] == summary["best_step"])
    assert result["accuracy"] == best["accuracy"] and result["examples"] == 40
    assert (tmp_path / f"eval_validation_step{summary['best_step']}.json").exists()


def test_early_stopping_after_patience(tiny_bert_dir, sst2_slice, tmp_path):
    config = tiny_config(tiny_bert_dir, sst2_slice, eval_every=1, patience=2, max_steps=50)
    config.optim.lr = 0.0  # the metric cannot improve after the first eval
    summary = train(config, str(tmp_path))
    assert summary["final_step"] == 3 and summary["best_step"] == 1


def test_zero_steps_evaluates_the_pretrained_model(tiny_bert_dir, sst2_slice, tmp_path):
    # A zero-shot baseline is a run like any other: evals, a step-0 checkpoint, a summary.
    config = tiny_config(tiny_bert_dir, sst2_slice, max_steps=0, final_split="validation")
    config.data.eval_split, config.data.holdout_rows = "holdout", 16
    summary = train(config, str(tmp_path))
    assert summary["final_step"] == 0 and summary["best_step"] == 0
    assert summary["trainable_params"] == 0 and summary["final"]["step"] == 0
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"eval"' in line]
    assert [e["step"] for e in evals] == [0]
    pretrained = run_eval(config, str(tmp_path / "eval"), "validation", which="pretrained")
    assert pretrained["accuracy"] == summary["final"]["accuracy"]
    assert train(config, str(tmp_path))["final_step"] == 0  # a rerun resumes at step 0


def run_cli(*args, cwd=REPO):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("FINETUNE_JAX_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "finetune_jax.train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "flags,expected",
    [
        (
            ["--config.optim.lrr=1e-3"],
            ["--config.optim.lrr=1e-3: unknown config key 'optim.lrr'", "did you mean 'lr'?"],
        ),
        (
            ["--config.optimizer.lr=1e-3"],
            [
                "--config.optimizer.lr=1e-3: unknown config key 'optimizer.lr': 'optimizer' is "
                "not a config section; did you mean 'optim'?"
            ],
        ),
        (["--config.optim.lr=fast"], ["--config.optim.lr=fast", "could not convert"]),
        (["--config.train.max_steps=abc"], ["--config.train.max_steps=abc: invalid literal"]),
        (["--config=configs/nonexistent.py"], ["--config=configs/nonexistent.py", "No such file"]),
        (
            [
                "--config.optim.preset=rules",
                "--config.optim.rules=((r'classifier/.*', 'trainable'),)",
            ],
            ["matched by no rule", "bert/embeddings/word_embeddings/embedding"],
        ),
        (["--config.data.dir=/nonexistent/sst2"], ["/nonexistent/sst2"]),
        (["--config.data.task=sst3"], ["'sst3'", "sst2"]),
    ],
    ids=[
        "unknown-key",
        "unknown-section",
        "wrong-type",
        "wrong-type-int",
        "missing-config-file",
        "unmatched-rules",
        "missing-data-dir",
        "unknown-task",
    ],
)
def test_cli_bad_input_is_one_clear_line(flags, expected, tmp_path):
    """One `error:` line that keeps the message's quotes and names only the bad flag (a
    good override beside it, `--config.train.log_every=5`, is not blamed)."""
    result = run_cli(
        "--config=configs/glue/sst2_minilm.py",
        f"--workdir={tmp_path}",
        "--config.train.log_every=5",
        *flags,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    for text in expected:
        assert text in errors[0], result.stderr[-2000:]
    assert "log_every" not in errors[0]


def test_cli_model_dir_without_weights_is_a_clear_error(tiny_bert_dir, tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text((Path(tiny_bert_dir) / "config.json").read_text())
    result = run_cli(
        "--config=configs/glue/sst2_minilm.py",
        f"--workdir={tmp_path / 'run'}",
        f"--config.model.name={model_dir}",
        f"--config.data.dir={SST2}",
    )
    assert result.returncode == 2, result.stderr
    assert str(model_dir) in result.stderr and "safetensors" in result.stderr
    assert "Traceback" not in result.stderr


def _tsv_column(path: Path, column: str, rows: int | None = None) -> np.ndarray:
    lines = path.read_text().splitlines()
    index = lines[0].split("\t").index(column)
    return np.asarray([float(line.split("\t")[index]) for line in lines[1:][:rows]])


def test_prior_head_bias_is_the_train_label_prior(tiny_bert_dir, sst2_slice, tmp_path):
    # Regression (STS-B): the mean train score, holdout rows excluded.
    stsb = tmp_path / "stsb"
    stsb.mkdir()
    for name, rows in (("train.tsv", 60), ("dev.tsv", 10)):
        lines = (SHARED_DATA / "glue" / "stsb" / name).read_text().splitlines(keepends=True)
        (stsb / name).write_text("".join(lines[: rows + 1]))
    config = tiny_config(tiny_bert_dir, stsb)
    config.data.task, config.data.holdout_rows = "stsb", 12
    assert jax.device_get(
        builder.build(config).pretrained_params()["classifier"]["bias"]
    ).tolist() == [0.0]  # default

    config.model.head_bias_init = "prior"
    exp = builder.build(config)
    scores = _tsv_column(stsb / "train.tsv", "score")
    holdout = np.asarray(exp.data.examples("holdout").labels)
    assert len(holdout) == 12
    expected = (scores.sum() - holdout.sum()) / (len(scores) - len(holdout))
    np.testing.assert_allclose(exp.pretrained_params()["classifier"]["bias"], [expected], rtol=1e-6)

    # Classification (SST-2): softmax(bias) is the add-one smoothed class frequency.
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.model.head_bias_init = "prior"
    bias = jax.device_get(builder.build(config).pretrained_params()["classifier"]["bias"])
    labels = _tsv_column(sst2_slice / "train.tsv", "label").astype(int)
    counts = np.bincount(labels, minlength=2) + 1.0
    np.testing.assert_allclose(jax.nn.softmax(bias), counts / counts.sum(), rtol=1e-6)


def test_head_bias_init_errors_name_the_key(tiny_bert_dir, sst2_slice):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.model.head_bias_init = "mean"
    with pytest.raises(ValueError, match=r"model.head_bias_init='mean': expected one of"):
        builder.build(config)
    config.model.head_bias_init = "prior"
    config.data.task = "gsm8k"
    config.data.buckets = base_config().data.buckets  # a text key chat tasks do not read
    with pytest.raises(ValueError, match=r"data.task='gsm8k' \(causal_lm\) has no such head"):
        builder.build(config)


def test_a_data_key_of_another_kind_is_an_error(tiny_bert_dir, sst2_slice):
    """A key the task's kind does not read would be silently ignored: it is refused by name
    before anything loads."""
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.data.image_size = 224
    with pytest.raises(ValueError, match=r"data.image_size=224 is not read by text_classific"):
        builder.build(config)
    config.data.image_size = 0
    config.data.task = "speech_commands"
    with pytest.raises(ValueError, match=r"data.buckets=\(16, 32\) is not read by speech_rec"):
        builder.build(config)


def test_beam_search_is_refused_where_it_would_be_ignored(tiny_bert_dir, sst2_slice):
    """Only the encoder-decoder kinds (speech, translation) implement beam search: a causal-LM
    or classification run asking for it is told so before anything loads, rather than
    silently decoding greedily."""
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.data.buckets = base_config().data.buckets  # a text key chat tasks do not read
    config.generate.num_beams = 4
    for task in ("sst2", "gsm8k"):
        config.data.task = task
        with pytest.raises(
            ValueError, match=r"num_beams=4: beam search is for the encoder-decoder kinds"
        ):
            builder.build(config)


def test_final_split_must_differ_from_the_selection_split(tiny_bert_dir, sst2_slice, tmp_path):
    config = tiny_config(tiny_bert_dir, sst2_slice, final_split="validation")
    with pytest.raises(ValueError, match=r"train.final_split='validation' is also data.eval_split"):
        train(config, str(tmp_path))
    assert not any(tmp_path.iterdir())  # refused before writing anything


def test_selection_metric_is_checked_and_perplexity_is_lower_is_better(
    tiny_bert_dir, sst2_slice, tmp_path
):
    assert metric_mode("perplexity") == "min" and metric_mode("loss") == "min"
    assert metric_mode("spearman") == "max"
    config = tiny_config(tiny_bert_dir, sst2_slice, metric="acuracy")
    with pytest.raises(ValueError, match=r"train.metric='acuracy' is not reported by task 'sst2'"):
        builder.build(config)
    # Resuming under another selection metric would mix two notions of "best".
    train(tiny_config(tiny_bert_dir, sst2_slice, max_steps=3), str(tmp_path))
    config = tiny_config(tiny_bert_dir, sst2_slice, max_steps=6, metric="loss")
    with pytest.raises(
        ValueError, match=r"selecting checkpoints on 'accuracy'.* now selects on 'loss'"
    ):
        train(config, str(tmp_path))


def test_tensorboard_hint_is_a_command_that_runs_here_or_how_to_install_it(monkeypatch, tmp_path):
    """`tensorboard --logdir` is shown only where that command exists; where TensorBoard is
    missing the hint says how to install it (an optional extra)."""
    import importlib.util
    import shutil

    from finetune_jax.training import loop

    logdir = tmp_path / "tensorboard"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    hint = loop.tensorboard_hint(logdir)
    assert hint == f"to view: pip install -e '.[tensorboard]', then tensorboard --logdir {logdir}"
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert loop.tensorboard_hint(logdir) == f"open: tensorboard --logdir {logdir}"
