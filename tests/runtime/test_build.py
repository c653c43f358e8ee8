"""The C++ kernels must be built by the project's own install (otherwise the kernel tests would skip)."""

import os

import pytest

from sparseland.runtime import kernels


@pytest.mark.skipif(os.environ.get("SPARSELAND_ALLOW_NO_EXT") == "1", reason="explicitly allowed to run without")
def test_extension_is_built():
    assert kernels.extension_available(), "run `pip install --no-build-isolation -e .` (or `make setup`)"
