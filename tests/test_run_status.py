"""A run that did not finish says so: summary.json records `finished`, and eval / export /
predict of such a workdir name it on their first line (a preempted run exits 0, so
`train && export` would otherwise export a half-trained model without a word)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from finetune_jax.eval import run_eval
from finetune_jax.export import export
from finetune_jax.predict import predict
from finetune_jax.train import train
from finetune_jax.training import run_status, workdir_lock
from tests.helpers import REPO, tiny_config


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, tiny_bert_dir, sst2_slice):
    """(workdir, config, summary) of the tiny BERT trained 3 of its 6 steps."""
    workdir = tmp_path_factory.mktemp("stopped_run")
    config = tiny_config(tiny_bert_dir, sst2_slice)
    summary = train(config, str(workdir), until_step=3)
    return workdir, config, summary


@pytest.fixture
def copy_of(tmp_path):
    def copy(workdir):
        shutil.copytree(workdir, tmp_path / "run")
        return tmp_path / "run"

    return copy


def first_error_line(capsys) -> str:
    return capsys.readouterr().err.splitlines()[0]


def test_summary_says_whether_the_run_finished_and_names_its_times(stopped_run, copy_of):
    workdir, config, summary = stopped_run
    assert summary["finished"] is False and summary["stopped_by"] is None
    # The step loop's time, then the whole run's (data preparation too), then the process's.
    assert "wall_time_s" not in summary
    assert 0 < summary["loop_time_s"] < summary["run_time_s"] < summary["process_time_s"]
    assert json.loads((workdir / "summary.json").read_text())["finished"] is False
    finished = copy_of(workdir)
    resumed = train(config, str(finished))
    assert resumed["final_step"] == 6 and resumed["finished"] is True
    assert run_status.unfinished_note(finished) is None


def test_eval_export_and_predict_of_an_unfinished_run_say_so_first(
    stopped_run, sst2_slice, tmp_path, capsys
):
    workdir, config, _ = stopped_run
    expected = (
        f"warning: the run in {workdir} did not finish (stopped at step 3 of 6); reading its "
        "latest finished checkpoints (latest: step 3)"
    )
    run_eval(config, str(workdir), "validation", "latest")
    assert first_error_line(capsys).startswith(expected)
    export(config, str(workdir), str(tmp_path / "hf"), which="latest")
    assert first_error_line(capsys).startswith(expected)
    predict(config, str(workdir), str(sst2_slice / "dev.tsv"), str(tmp_path / "p.csv"), "latest")
    assert first_error_line(capsys).startswith(expected)


def test_the_note_says_why_a_run_is_unfinished(stopped_run, copy_of):
    workdir = copy_of(stopped_run[0])
    path = workdir / "summary.json"
    summary = json.loads(path.read_text())

    def note():
        return run_status.unfinished_note(workdir)

    with workdir_lock.WorkdirLock(workdir) as lock:
        assert note() == (
            f"warning: {workdir} is still being trained ({lock.holder.describe()}); reading "
            "only its finished checkpoints"
        )
    path.write_text(json.dumps({**summary, "stopped_by": "SIGTERM"}))
    assert "did not finish (stopped by SIGTERM at step 3 of 6)" in note()
    path.write_text(json.dumps({**summary, "final_step": 0, "finished": True}))
    assert "trained on past its summary (step 0) to step 3" in note()
    path.unlink()
    assert "did not finish (no summary.json" in note()
    # A summary from before `finished` was recorded: judged by the run's max_steps.
    old = {k: v for k, v in summary.items() if k != "finished"}
    path.write_text(json.dumps(old))
    assert "did not finish (stopped at step 3 of 6)" in note()
    path.write_text(json.dumps({**old, "final_step": 3, "stopped_by": "early stopping"}))
    assert note() is None


def test_eval_beside_a_running_trainer_reads_only_finished_checkpoints(
    stopped_run, copy_of, capsys
):
    workdir, config, _ = stopped_run
    workdir = copy_of(workdir)
    (workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1").mkdir()  # a save in progress
    with workdir_lock.WorkdirLock(workdir):  # a trainer holds the workdir
        result = run_eval(config, str(workdir), "validation", "latest")
    assert result["step"] == 3
    assert "is still being trained" in first_error_line(capsys)


def test_export_cli_of_an_unfinished_run_says_so_on_its_first_line(stopped_run, tmp_path):
    workdir = stopped_run[0]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune_jax.export",
            f"--workdir={workdir}",
            f"--out={tmp_path / 'hf'}",
            "--checkpoint=latest",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.splitlines()[0].startswith(
        f"warning: the run in {workdir} did not finish"
    ), result.stderr[-3000:]


def test_a_trainer_without_a_checkpoint_yet_is_named_too(tmp_path):
    assert run_status.unfinished_note(tmp_path) is None  # nothing there: the reader's error
    with workdir_lock.WorkdirLock(tmp_path) as lock:
        assert run_status.unfinished_note(tmp_path) == (
            f"warning: {tmp_path} is still being trained ({lock.holder.describe()}); it has no "
            "finished checkpoint yet"
        )
