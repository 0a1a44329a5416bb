"""Two real processes on 127.0.0.1 (jax.distributed + gloo) form one 8-device mesh: per-process
data loading, one multi-process checkpoint, the same losses and params as one process."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np

from finetune_jax.train import train
from finetune_jax.training import builder, checkpoints
from tests.helpers import REPO, tiny_config, train_losses

WORKER = REPO / "tests" / "multidevice" / "two_process_worker.py"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_and_checkpoint_like_one(tiny_bert_dir, sst2_slice, tmp_path):
    config = tiny_config(tiny_bert_dir, sst2_slice)
    train(config, str(tmp_path / "one"))  # this process: 8 devices

    port, workdir = free_port(), tmp_path / "two"
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS": "cpu",
    }
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(port),
                str(i),
                str(workdir),
                str(tiny_bert_dir),
                str(sst2_slice),
            ],
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
