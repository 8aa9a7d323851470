"""pytest configuration: the `gpu` marker, and the tests folder on `sys.path`.

GPU tests carry ``@pytest.mark.gpu`` (or a class/module ``pytestmark``) and are skipped, with
the reason, when JAX's default backend is not a GPU. x64 is never switched on globally:
tests that need float64 JAX arrays use ``jax.enable_x64(True)`` as a context manager.
"""

from __future__ import annotations

import os
import sys

import pytest

# Test modules import the shared battery as `import battery`, whatever the import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU as JAX's default backend")


def pytest_collection_modifyitems(config, items):
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import jax

    backend = jax.default_backend()
    if backend == "gpu":
        return
    skip = pytest.mark.skip(reason=f"needs a GPU; JAX's default backend is {backend!r}")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
