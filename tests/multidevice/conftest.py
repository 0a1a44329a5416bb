"""This folder runs in its own pytest process with 8 fake CPU devices (see
tests/test_multidevice.py); collected from the main run it is skipped."""

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= 8:
        return
    skip = pytest.mark.skip(reason="needs 8 devices: run via tests/test_multidevice.py")
    for item in items:
        if "multidevice" in str(item.fspath):
            item.add_marker(skip)
