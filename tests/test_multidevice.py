"""Run tests/multidevice in a fresh process with 8 fake CPU devices.

XLA reads the device count once, before jax starts, so these tests cannot share this
process; a failure shows the child's pytest output."""

import os
import subprocess
import sys

from tests.helpers import REPO


def test_multidevice_suite():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "addopts=",
            "tests/multidevice",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout
