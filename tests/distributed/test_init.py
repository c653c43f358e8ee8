"""init_ray: a local instance runs its workers at the driver's priority (Ray's default is nice 15)."""

from __future__ import annotations

import sys
import types

import pytest

from sparseland.distributed import init_ray


def _fake_ray(calls: list):
    def init(**kwargs):
        import os

        calls.append((kwargs.get("address"), os.environ.get("RAY_worker_niceness")))  # noqa: SIM112 (Ray's name)

    return types.SimpleNamespace(is_initialized=lambda: False, init=init)


@pytest.mark.parametrize(("address", "preset", "expected"), [(None, None, "0"), (None, "7", "7"), ("auto", None, None)])
def test_local_instance_workers_not_niced(monkeypatch, address, preset, expected):
    calls: list = []
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(calls))
    if preset is None:
        monkeypatch.delenv("RAY_worker_niceness", raising=False)
    else:
        monkeypatch.setenv("RAY_worker_niceness", preset)
    init_ray(address)
    assert calls == [(address, expected)]
