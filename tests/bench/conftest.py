"""Frontier tests run tiny models: one thread avoids the 2-thread slowdown of small ops on a busy machine."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # noqa: ARG001  (tests/conftest.py's fixture, for every frontier test)
    yield
