"""This folder runs in its own pytest process with 8 fake CPU devices (see
tests/test_multidevice.py); collected from the main run it is skipped."""

import jax
import pytest


def pytest_collection_modifyitems(config, items):
    if jax.device_count() >= 8:
        return
    skip = pytest.mark.skip(reason="needs 8 devices: run via tests/test_multidevice.py")
    for item in items:
        # This hook sees every item of the session: skip only this folder's tests (not
        # tests/test_multidevice.py, which starts them in an 8-device process).
        if item.path.parent.name == "multidevice":
            item.add_marker(skip)
