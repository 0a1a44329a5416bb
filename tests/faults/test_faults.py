"""Fault injection: preemption, a crash mid-save, non-finite updates, determinism.

Each test injects one fault into a real run of the tiny model and checks what the run does;
README.md's fault table lists them.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from finetune_jax.data import text_loader
from finetune_jax.train import train
from finetune_jax.training import checkpoints
from finetune_jax.training.faults import NonFiniteError
from tests.helpers import REPO, SHARED_DATA, final_state, tiny_config, train_losses

pytestmark = pytest.mark.faults

LONG_RUN = {"max_steps": 200, "eval_every": 100, "checkpoint_every": 100}


def write_config_file(path, model_dir, data_dir, **train_overrides):
    path.write_text(
        "from tests.helpers import tiny_config\n\n\n"
        "def get_config():\n"
        f"    return tiny_config({str(model_dir)!r}, {str(data_dir)!r}, **{train_overrides!r})\n"
    )
    return path


def assert_same_run(config, dir_a, dir_b):
    a, b = final_state(config, dir_a), final_state(config, dir_b)
    assert int(a.step) == int(b.step)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.array_equal(x, y)  # bitwise: params, optimizer state, rng
    assert train_losses(dir_a) == train_losses(dir_b)


def wait_for(predicate, timeout=300, proc=None):
    deadline = time.time() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.communicate()[0][-3000:]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def start(args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_preempted_run_saves_exits_0_and_resumes_bitwise(tiny_bert_dir, sst2_slice, tmp_path, sig):
    config_file = write_config_file(tmp_path / "cfg.py", tiny_bert_dir, sst2_slice, **LONG_RUN)
    workdir = tmp_path / "preempted"
    proc = start(["-m", "finetune_jax.train", f"--config={config_file}", f"--workdir={workdir}"])
    metrics = workdir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc=proc)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stopped = final_state(tiny_config(tiny_bert_dir, sst2_slice, **LONG_RUN), workdir)
    assert 0 < int(stopped.step) < 200
    assert f"{sig.name}: stopped after step {int(stopped.step)}" in out

    config = tiny_config(tiny_bert_dir, sst2_slice, **LONG_RUN)
    train(config, str(workdir))
    train(config, str(tmp_path / "straight"))
    assert_same_run(config, workdir, tmp_path / "straight")


class SignalAtBatch:
    """Training batches that send this process SIGTERM as batch number `at` (1-based) is
    drawn: the run is preempted during that step."""

    def __init__(self, batches, at):
        self._batches, self._at, self._count = batches, at, 0

    def __next__(self):
        self._count += 1
        if self._count == self._at:
            signal.raise_signal(signal.SIGTERM)
        return next(self._batches)

    def __getattr__(self, name):  # state(), restore(), ... of the real iterator
        return getattr(self._batches, name)


def train_records(workdir):
    """metrics.jsonl's train records without their timings (which no two runs share)."""
    records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    return [
        {k: v for k, v in r.items() if k != "seconds_per_step"}
        for r in records
        if r["kind"] == "train"
    ]


def test_run_preempted_mid_log_window_logs_what_an_unbroken_run_logs(
    tiny_bert_dir, sst2_slice, tmp_path, monkeypatch
):
    # Logged every 4 steps, preempted after step 6: the window of steps 5-8 spans the stop.
    overrides = {"max_steps": 8, "log_every": 4, "eval_every": 8, "checkpoint_every": 8}
    config = tiny_config(tiny_bert_dir, sst2_slice, **overrides)
    train(config, str(tmp_path / "straight"))
    real = text_loader.ClassificationData.train_batches
    with monkeypatch.context() as patch:
        patch.setattr(
            text_loader.ClassificationData,
            "train_batches",
            lambda data: SignalAtBatch(real(data), at=6),
        )
        summary = train(config, str(tmp_path / "resumed"))
    assert summary["stopped_by"] == "SIGTERM" and summary["final_step"] == 6
    train(config, str(tmp_path / "resumed"))
    straight = train_records(tmp_path / "straight")
    assert [r["step"] for r in straight] == [4, 8]
    assert train_records(tmp_path / "resumed") == straight  # bitwise: loss, grad_norm, lr
    assert_same_run(config, tmp_path / "resumed", tmp_path / "straight")


def test_kill_during_save_keeps_previous_checkpoint(tiny_bert_dir, sst2_slice, tmp_path):
    overrides = {"max_steps": 9, "eval_every": 100, "checkpoint_every": 3}
    config_file = write_config_file(tmp_path / "cfg.py", tiny_bert_dir, sst2_slice, **overrides)
    workdir, marker = tmp_path / "killed", tmp_path / "saving-6"
    proc = start(
        [
            str(REPO / "tests" / "faults" / "slow_save_driver.py"),
            str(config_file),
            str(workdir),
            "6",
            str(marker),
        ]
    )
    wait_for(marker.exists, proc=proc)
    proc.kill()  # SIGKILL while step 6 sits in its temporary directory
    proc.communicate(timeout=60)

    config = tiny_config(tiny_bert_dir, sst2_slice, **overrides)
    assert int(final_state(config, workdir).step) == 3  # the partial step 6 is ignored
    train(config, str(workdir))  # resumes from 3
    train(config, str(tmp_path / "straight"))
    assert_same_run(config, workdir, tmp_path / "straight")


class PoisonedBatches:
    """Training batches where batch number `at` (1-based) carries a NaN weight."""

    def __init__(self, batches, at):
        self._batches, self._at, self._count = batches, at, 0

    def __next__(self):
        batch = next(self._batches)
        self._count += 1
        if self._count == self._at:
            batch["weights"] = batch["weights"].copy()
            batch["weights"][0] = np.nan
        return batch

    def __getattr__(self, name):  # state(), restore(), ... of the real iterator
        return getattr(self._batches, name)


def poison_batch(monkeypatch, at_batch):
    real = text_loader.ClassificationData.train_batches
    monkeypatch.setattr(
        text_loader.ClassificationData,
        "train_batches",
        lambda data: PoisonedBatches(real(data), at_batch),
    )


def test_nonfinite_halt_names_step_and_param_and_keeps_checkpoint(
    tiny_bert_dir, sst2_slice, tmp_path, monkeypatch
):
    poison_batch(monkeypatch, at_batch=5)
    config = tiny_config(tiny_bert_dir, sst2_slice)  # checkpoints every 3 steps
    with pytest.raises(NonFiniteError, match=r"step 5: .*first non-finite gradient: \S+/"):
        train(config, str(tmp_path))
    assert int(final_state(config, tmp_path).step) == 3  # nothing after the bad step saved


def test_nonfinite_skip_drops_the_update_and_counts_it(
    tiny_bert_dir, sst2_slice, tmp_path, monkeypatch
):
    poison_batch(monkeypatch, at_batch=5)
    config = tiny_config(tiny_bert_dir, sst2_slice)
    config.train.nonfinite = "skip"
    summary = train(config, str(tmp_path))
    assert summary["final_step"] == 6
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    skipped = {r["step"]: r["skipped"] for r in records if r["kind"] == "train"}
    assert skipped == {1: 0, 2: 0, 3: 0, 4: 0, 5: 1, 6: 0}
    state = final_state(config, tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


def test_same_config_and_seed_give_bitwise_identical_runs(tiny_bert_dir, sst2_slice, tmp_path):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    train(config, str(tmp_path / "a"))
    train(config, str(tmp_path / "b"))
    assert_same_run(config, tmp_path / "a", tmp_path / "b")


def test_disk_full_while_saving_is_an_error_and_keeps_earlier_checkpoints(
    tiny_bert_dir, sst2_slice, tmp_path, monkeypatch
):
    from orbax.checkpoint._src.path import async_path

    real_rename = async_path.rename

    async def full_disk(src, dst):
        if os.path.basename(str(dst)) == "6":
            raise OSError(28, "No space left on device")
        return await real_rename(src, dst)

    monkeypatch.setattr(async_path, "rename", full_disk)
    config = tiny_config(tiny_bert_dir, sst2_slice)
    with pytest.raises(checkpoints.CheckpointError, match="No space left.*intact"):
        train(config, str(tmp_path))
    assert int(final_state(config, tmp_path).step) == 3


def test_workdir_that_is_a_file_is_a_clear_error(tiny_bert_dir, sst2_slice, tmp_path):
    (tmp_path / "taken").write_text("not a directory")
    with pytest.raises(PermissionError, match="taken.*not a writable directory"):
        train(tiny_config(tiny_bert_dir, sst2_slice), str(tmp_path / "taken" / "run"))


@pytest.fixture
def stsb_slice(tmp_path):
    out = tmp_path / "stsb"
    out.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        lines = (SHARED_DATA / "glue" / "stsb" / name).read_text().splitlines(keepends=True)
        (out / name).write_text("".join(lines[:41]))
    return out


def test_checkpoint_of_another_model_names_param_and_shapes(
    tiny_bert_dir, sst2_slice, stsb_slice, tmp_path
):
    train(tiny_config(tiny_bert_dir, sst2_slice, max_steps=3), str(tmp_path))
    regression = tiny_config(tiny_bert_dir, stsb_slice, max_steps=6)
    regression.data.task = "stsb"
    with pytest.raises(
        checkpoints.CheckpointError,
        match=r"'classifier/bias' has shape \(2,\) in the checkpoint but \(1,\)",
    ):
        train(regression, str(tmp_path))


def test_checkpoint_with_another_optimizer_layout_is_a_clear_error(
    tiny_bert_dir, sst2_slice, tmp_path
):
    train(tiny_config(tiny_bert_dir, sst2_slice, max_steps=3), str(tmp_path))
    probe = tiny_config(tiny_bert_dir, sst2_slice)
    probe.optim.preset = "linear_probe"
    # The workdir's config.json names what changed, before anything is built.
    with pytest.raises(ValueError, match="optim.preset='full'.*optim.preset='linear_probe'"):
        train(probe, str(tmp_path))
    # Without that record, Orbax's mismatch is still one line, not its dump of every leaf.
    (tmp_path / "config.json").unlink()
    with pytest.raises(checkpoints.CheckpointError, match="optim.preset") as error:
        train(probe, str(tmp_path))
    assert "\n" not in str(error.value)


def test_a_second_trainer_on_a_busy_workdir_is_refused_and_writes_nothing(
    tiny_bert_dir, sst2_slice, tmp_path
):
    # Steps take milliseconds: long enough to be stopped, never to end, while the test runs.
    endless = {"max_steps": 10**6, "eval_every": 0, "checkpoint_every": 10**5}
    config_file = write_config_file(tmp_path / "cfg.py", tiny_bert_dir, sst2_slice, **endless)
    workdir = tmp_path / "run"
    command = ["-m", "finetune_jax.train", f"--config={config_file}", f"--workdir={workdir}"]
    first = start(command)
    metrics = workdir / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, proc=first)
    files = lambda: {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()}  # noqa: E731
    before = {k: v for k, v in files().items() if k != "metrics.jsonl"}
    second = start([*command, "--config.optim.lr=3e-5"])  # another setting, same workdir
    out, _ = second.communicate(timeout=300)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert second.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out[-3000:]
    holder = f"host {socket.gethostname()}, pid {first.pid}, started "
    assert f"workdir {workdir} is in use by another training run ({holder}" in errors[0]
    assert f"delete {workdir / 'train.lock'}" in errors[0]
    assert {k: v for k, v in files().items() if k != "metrics.jsonl"} == before  # untouched

    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:]
    assert not (workdir / "train.lock").exists()  # released at the end


SAVE_EVERY_3 = {"max_steps": 200, "eval_every": 100, "checkpoint_every": 3}


def start_slow_save(tmp_path, tiny_bert_dir, sst2_slice, seconds):
    """A run whose save of step 6 takes `seconds` before it is renamed into place:
    (process, workdir, marker touched when that save starts waiting)."""
    config_file = write_config_file(tmp_path / "cfg.py", tiny_bert_dir, sst2_slice, **SAVE_EVERY_3)
    workdir, marker = tmp_path / "run", tmp_path / "saving-6"
    driver = REPO / "tests" / "faults" / "slow_save_driver.py"
    proc = start([str(driver), str(config_file), str(workdir), "6", str(marker), str(seconds)])
    wait_for(marker.exists, proc=proc)
    return proc, workdir


def test_a_second_ctrl_c_during_the_save_waits_for_it_and_says_so(
    tiny_bert_dir, sst2_slice, tmp_path
):
    proc, workdir = start_slow_save(tmp_path, tiny_bert_dir, sst2_slice, seconds=5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "Traceback" not in out, out[-3000:]
    assert (
        "SIGINT: saving a checkpoint after this step, then stopping; please wait "
        "(Ctrl-C 2 more times aborts without saving)" in out
    )
    assert (
        "SIGINT: still stopping: waiting for the checkpoint to be saved "
        "(Ctrl-C 1 more time aborts without saving)" in out
    )
    stopped = int(final_state(tiny_config(tiny_bert_dir, sst2_slice, **SAVE_EVERY_3), workdir).step)
    assert stopped > 6 and f"SIGINT: stopped after step {stopped}, checkpoint saved" in out


def test_a_third_ctrl_c_aborts_at_once_in_one_line_keeping_finished_checkpoints(
    tiny_bert_dir, sst2_slice, tmp_path
):
    proc, workdir = start_slow_save(tmp_path, tiny_bert_dir, sst2_slice, seconds=600)
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in out, out[-3000:]
    assert "Ctrl-C x3: aborting now without saving; finished checkpoints are kept" in out
    config = tiny_config(tiny_bert_dir, sst2_slice, **SAVE_EVERY_3)
    assert int(final_state(config, workdir).step) == 3  # step 6 never finished
    assert not (workdir / "train.lock").exists()  # released on the way out
