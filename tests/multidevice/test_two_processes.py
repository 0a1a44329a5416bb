"""Two real processes on 127.0.0.1 (jax.distributed + gloo) form one 8-device mesh: per-process
data loading, one multi-process checkpoint, the same losses and params as one process; and
such a job is refused as a whole on a workdir that another trainer holds."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from finetune_jax.train import train
from finetune_jax.training import builder, checkpoints, manifest
from tests.helpers import REPO, tiny_config, train_losses

WORKER = REPO / "tests" / "multidevice" / "two_process_worker.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(workdir, model_dir, data_dir, *options):
    """Runs `two_process_worker.py` as two processes of 4 CPU devices each on `workdir`
    (3 steps, then a resume to 6); fails with a worker's output unless both succeed."""
    port = free_port()
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(port), str(i), str(workdir), str(model_dir)]
            + [str(data_dir), *options],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]


def test_two_processes_train_and_checkpoint_like_one(tiny_bert_dir, sst2_slice, tmp_path):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    train(config, str(tmp_path / "one"))  # this process: 8 devices

    workdir = tmp_path / "two"
    run_workers(workdir, tiny_bert_dir, sst2_slice)

    one, two = dict(train_losses(tmp_path / "one")), dict(train_losses(workdir))
    assert sorted(two) == sorted(one) == list(range(1, 7))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5)

    exp = builder.build(config)
    states = []
    for path in (tmp_path / "one", workdir):
        manager = checkpoints.make_manager(str(path), 2, None, read_only=True)
        state, progress = checkpoints.restore_latest(manager, exp.abstract_state())
        states.append(jax.device_get(state))
    assert int(states[0].step) == int(states[1].step) == 6
    for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_a_two_process_job_on_a_workdir_another_trainer_holds_is_refused_and_writes_nothing(
    tiny_bert_dir, sst2_slice, tmp_path
):
    """A jax.distributed job of two processes (lr 3e-5) started on a workdir that a
    one-process trainer (lr 1e-4) is training in: refused on every process, in one line
    naming the holder; nothing of the job is written, and the trainer goes on to its end."""
    config_file = tmp_path / "cfg.py"
    config_file.write_text(
        "from tests.helpers import tiny_config\n\n\n"
        "def get_config():\n"
        f"    return tiny_config({str(tiny_bert_dir)!r}, {str(sst2_slice)!r}, max_steps=10**6, "
        "eval_every=0, checkpoint_every=10**5)\n"  # never ends while the test runs
    )
    workdir = tmp_path / "run"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    env.pop("FINETUNE_JAX_DEBUG", None)
    command = [sys.executable, "-m", "finetune_jax.train", f"--config={config_file}"]
    command.append(f"--workdir={workdir}")

    def start(*flags):
        return subprocess.Popen(
            [*command, *flags],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    trainer = start("--config.optim.lr=1e-4")
    metrics, deadline = workdir / "metrics.jsonl", time.time() + 600
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert time.time() < deadline and trainer.poll() is None, trainer.communicate()[0][-3000:]
        time.sleep(0.5)
    port = free_port()
    job = [
        start(
            "--config.optim.lr=3e-5",
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    holder = f"host {socket.gethostname()}, pid {trainer.pid}, started "
    for proc in job:
        out = proc.communicate(timeout=600)[0]
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1, out[-3000:]
        assert f"workdir {workdir} is in use by another training run ({holder}" in errors[0]
    assert trainer.poll() is None  # still training
    trainer.send_signal(signal.SIGTERM)
    out = trainer.communicate(timeout=600)[0]
    assert trainer.returncode == 0, out[-3000:]

    (start_record,) = manifest.read_manifest(str(workdir))  # one start: the trainer's
    assert start_record["devices"]["process_count"] == 1
    assert json.loads((workdir / "config.json").read_text())["optim"]["lr"] == 1e-4
    steps = [step for step, _ in train_losses(workdir)]
    assert steps == list(range(1, len(steps) + 1))  # one run's log, not two interleaved
    assert not (workdir / "train.lock").exists()
