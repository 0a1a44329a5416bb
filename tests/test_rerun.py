"""Training again on an existing workdir (training/rerun.py) and the loop's rough edges: a
finished run keeps its summary, state-shaping changes and missing split files fail before the
model loads, a raised max_steps says what happens to the lr schedule, intervals of 0, plain
log lines without the bar, the lr at the logged step, and no NaN in any JSON of a run."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import numpy as np
import pytest

from finetune_jax.hf import model_files
from finetune_jax.training import optim, rerun, workdir_files
from finetune_jax.training.loop import train
from tests.helpers import tiny_config


def _records(workdir, kind):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def _no_weights(model_ref):
    raise AssertionError(f"the pretrained weights of {model_ref} were read")


@pytest.fixture(scope="module")
def finished(tiny_bert_dir, sst2_slice, tmp_path_factory):
    """A finished 4-step run with no periodic eval or checkpoint, log every 2, no bar:
    (config, workdir, its summary, what it printed)."""
    config = tiny_config(
        tiny_bert_dir, sst2_slice, max_steps=4, log_every=2, eval_every=0, checkpoint_every=0
    )
    workdir = tmp_path_factory.mktemp("finished")
    with contextlib.redirect_stdout(io.StringIO()) as out:
        summary = train(config, str(workdir))
    return config, workdir, summary, out.getvalue()


def test_zero_intervals_mean_only_the_last_step(finished):
    config, workdir, summary, _ = finished
    assert summary["final_step"] == 4
    assert [r["step"] for r in _records(workdir, "eval")] == [4]  # no periodic eval
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4]  # no periodic checkpoint


def test_logged_lr_is_the_lr_of_the_logged_step(finished):
    config, workdir, _, _ = finished
    lr = optim.schedule(config.optim, config.train.max_steps)
    train_records = _records(workdir, "train")
    assert [r["step"] for r in train_records] == [2, 4]
    for r in train_records:  # step s runs with the schedule at count s - 1
        assert r["lr"] == pytest.approx(float(lr(r["step"] - 1)))
    assert float(lr(0)) != float(lr(1))  # a mean over the interval would differ


def test_rerunning_a_finished_run_keeps_its_summary(finished, monkeypatch, capsys):
    config, workdir, summary, _ = finished
    before = (workdir / "summary.json").read_bytes()
    monkeypatch.setattr(model_files, "open_tensors", _no_weights)
    again = train(config, str(workdir))
    assert (workdir / "summary.json").read_bytes() == before
    assert again == json.loads(before) and again["final_step"] == 4
    assert "already finished at step 4" in capsys.readouterr().out


def test_no_nan_in_any_json_of_a_run(tiny_bert_dir, sst2_slice, tmp_path, finished):
    # No step run: the summary's timings are NaN (no interval was measured).
    config = tiny_config(tiny_bert_dir, sst2_slice, max_steps=0)
    summary = train(config, str(tmp_path))
    assert math.isnan(summary["steady_seconds_per_step"])
    assert json.loads((tmp_path / "summary.json").read_text())["steady_seconds_per_step"] is None

    def strict(token):
        raise AssertionError(f"{token} in a JSON file")

    for workdir in (tmp_path, finished[1]):
        files = [*workdir.glob("*.json"), *workdir.glob("*.jsonl")]
        assert {"summary.json", "config.json", "manifest.json"} <= {f.name for f in files}
        for path in files:
            for line in [path.read_text()] if path.suffix == ".json" else path.open():
                json.loads(line, parse_constant=strict)


def test_json_text_writes_null_for_non_finite_values():
    value = {"a": float("nan"), "b": [float("inf"), 1.5], "c": np.float32("nan"), "d": "x"}
    assert json.loads(workdir_files.json_text(value)) == {
        "a": None,
        "b": [None, 1.5],
        "c": None,
        "d": "x",
    }


def test_train_prints_where_its_outputs_are_and_logs_without_the_bar(finished):
    _, workdir, _, out = finished
    assert f"outputs in {workdir}" in out
    assert "summary.json" in out and "checkpoints/ (steps [4])" in out
    assert f"tensorboard --logdir {workdir / 'tensorboard'}" in out
    # train.progress=False (tiny_config): the train loss still shows, one line per log step
    logged = [line for line in out.splitlines() if line.startswith("step ") and "loss=" in line]
    assert [line.split(":")[0] for line in logged[:2]] == ["step 2", "step 4"]


def test_preset_change_on_resume_names_the_keys_before_the_model_loads(finished, monkeypatch):
    config, workdir, _, _ = finished
    changed = config.copy_and_resolve_references()
    changed.optim.preset = "lora"
    changed.peft.rank = 2
    changed.train.max_steps = 6
    monkeypatch.setattr(model_files, "open_tensors", _no_weights)
    with pytest.raises(ValueError) as error:
        train(changed, str(workdir))
    message = str(error.value)
    assert "optim.preset='full'" in message and "optim.preset='lora'" in message
    assert "peft.rank=0" in message and "peft.rank=2" in message
    assert "new --workdir" in message


def test_raised_max_steps_resumes_with_a_note_on_the_schedule(finished, tmp_path, capsys):
    config, workdir, _, _ = finished
    shutil.copytree(workdir, tmp_path / "run")
    longer = config.copy_and_resolve_references()
    longer.train.max_steps, longer.train.log_every = 6, 0  # 0: log at the end only
    summary = train(longer, str(tmp_path / "run"))
    assert summary["final_step"] == 6
    assert [r["step"] for r in _records(tmp_path / "run", "train")] == [2, 4, 6]
    old = float(optim.schedule(config.optim, 4)(4))
    new = float(optim.schedule(longer.optim, 6)(4))
    assert old != new
    note = next(line for line in capsys.readouterr().out.splitlines() if "lr schedule" in line)
    assert "train.max_steps 4 -> 6" in note and f"{old:.4g} -> {new:.4g}" in note


def test_missing_split_files_fail_before_the_model_loads(
    tiny_bert_dir, sst2_slice, tmp_path, monkeypatch
):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(sst2_slice / "train.tsv", data)
    monkeypatch.setattr(model_files, "open_tensors", _no_weights)
    config = tiny_config(tiny_bert_dir, data)  # no dev.tsv: the eval split is missing
    with pytest.raises((OSError, ValueError), match="dev.tsv"):
        train(config, str(tmp_path / "a"))
    # Selecting on a holdout of train, the final eval on the missing validation split.
    config.data.eval_split, config.data.holdout_rows = "holdout", 16
    config.train.final_split = "validation"
    with pytest.raises((OSError, ValueError), match="dev.tsv"):
        train(config, str(tmp_path / "b"))


def test_schedule_note_only_when_the_schedule_changed(tiny_bert_dir, sst2_slice):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    previous = json.loads(workdir_files.json_text(config.to_dict(), default=str))
    assert rerun.schedule_note(previous, config, 3) is None
    assert rerun.schedule_note(None, config, 3) is None
    config.optim.lr = 1e-3
    assert "optim.lr 0.0001 -> 0.001" in rerun.schedule_note(previous, config, 3)


@pytest.mark.parametrize(
    "summary,end,latest,finished",
    [
        ({"final_step": 6, "stopped_by": None}, 6, 6, True),
        ({"final_step": 6, "stopped_by": None}, 9, 6, False),  # max_steps raised: train on
        ({"final_step": 3, "stopped_by": "early stopping"}, 9, 3, True),
        ({"final_step": 3, "stopped_by": "SIGTERM"}, 6, 3, False),  # preempted: resume
        ({"final_step": 6, "stopped_by": None}, 6, 3, False),  # summary of a lost checkpoint
        (None, 6, 6, False),  # crashed before writing its summary
    ],
    ids=["done", "raised", "early-stopped", "preempted", "stale", "no-summary"],
)
def test_finished_summary_only_for_a_run_that_reached_its_end(
    tmp_path, summary, end, latest, finished
):
    if summary is not None:
        (tmp_path / "summary.json").write_text(json.dumps(summary))
    result = rerun.finished_summary(str(tmp_path), end, latest)
    assert result == (summary if finished else None)
