"""End-to-end contracts of the training loop on a tiny random BERT and a slice of SST-2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from finetune_jax import checkpoint, experiment
from finetune_jax.config import base_config
from finetune_jax.eval import run_eval
from finetune_jax.train import train

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "data" / "glue" / "sst2"


@pytest.fixture(scope="module")
def sst2_slice(tmp_path_factory):
  """The first rows of the real SST-2 files: enough for a few steps, fast to tokenize."""
  out = tmp_path_factory.mktemp("sst2")
  for name, rows in (("train.tsv", 200), ("dev.tsv", 40)):
    lines = (SST2 / name).read_text().splitlines(keepends=True)[: rows + 1]
    (out / name).write_text("".join(lines))
  return out


def tiny_config(model_dir, data_dir, **train):
  config = base_config()
  config.model.name = str(model_dir)
  config.data.dir = str(data_dir)
  config.data.max_length = 32
  config.data.buckets = (16, 32)
  config.train.batch_size = 8
  config.train.max_steps = 6
  config.train.log_every = 1
  config.train.eval_every = 3
  config.train.checkpoint_every = 3
  config.train.progress = False
  for k, v in train.items():
    config.train[k] = v
  return config


def final_state(config, workdir):
  exp = experiment.build(config)
  manager = checkpoint.make_manager(str(workdir), 2, None, read_only=True)
  state, _ = checkpoint.restore_latest(manager, exp.abstract_state())
  return jax.device_get(state)


def train_losses(workdir):
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def test_frozen_leaves_unchanged_trainable_changed(tiny_bert_dir, sst2_slice):
  config = tiny_config(tiny_bert_dir, sst2_slice)
  config.optim.preset = "linear_probe"
  exp = experiment.build(config)
  state = exp.initial_state()
  batches = experiment.train_batches(exp)
  for _ in range(3):
    state, _ = exp.train_step(state, exp.put_batch(next(batches)))
  after = jax.device_get(state.params)
  for before, now, trainable in zip(jax.tree.leaves(exp.params), jax.tree.leaves(after),
                                    jax.tree.leaves(exp.groups.trainable)):
    if trainable:
      assert not np.array_equal(before, now)
    else:
      assert np.array_equal(before, now)  # bitwise


def test_resumed_run_is_bitwise_identical(tiny_bert_dir, sst2_slice, tmp_path):
  config = tiny_config(tiny_bert_dir, sst2_slice)
  train(config, str(tmp_path / "straight"))
  train(config, str(tmp_path / "resumed"), until_step=3)
  assert final_state(config, tmp_path / "resumed").step == 3
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
  evals = [json.loads(l) for l in open(tmp_path / "metrics.jsonl") if '"eval"' in l]
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


def run_cli(*args, cwd=REPO):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("FINETUNE_JAX_DEBUG", None)
  return subprocess.run([sys.executable, "-m", "finetune_jax.train", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=300)


def test_cli_unknown_config_key_is_a_clear_error(tmp_path):
  result = run_cli("--config=configs/glue/sst2_minilm.py", f"--workdir={tmp_path}",
                   "--config.optim.lrr=1e-3")
  assert result.returncode != 0
  assert "lrr" in result.stderr and "Traceback" not in result.stderr


def test_cli_model_dir_without_weights_is_a_clear_error(tiny_bert_dir, tmp_path):
  model_dir = tmp_path / "model"
  model_dir.mkdir()
  (model_dir / "config.json").write_text((Path(tiny_bert_dir) / "config.json").read_text())
  result = run_cli("--config=configs/glue/sst2_minilm.py", f"--workdir={tmp_path / 'run'}",
                   f"--config.model.name={model_dir}", f"--config.data.dir={SST2}")
  assert result.returncode == 2, result.stderr
  assert str(model_dir) in result.stderr and "safetensors" in result.stderr
  assert "Traceback" not in result.stderr
