"""The CPU feature check: a CPU without AVX2/FMA/F16C runs the PyTorch references (one warning), not SIGILL."""

from __future__ import annotations

import warnings

import pytest

from sparseland.runtime import kernels


@pytest.fixture
def fresh_state(monkeypatch):
    """A kernels module state as at import (restored afterwards)."""
    monkeypatch.setattr(kernels, "_state", {"loaded": None, "forced": False, "warned": False, "cpu_warned": False})


def test_flags_parsed_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse2 avx avx2 fma f16c\n\nprocessor\t: 1\n")
    assert kernels.cpu_flags(str(info)) == {"fpu", "sse2", "avx", "avx2", "fma", "f16c"}
    assert kernels.cpu_flags(str(tmp_path / "missing")) is None  # unreadable: unknown
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert kernels.cpu_flags(str(tmp_path / "noflags")) is None


def test_missing_features():
    assert kernels.missing_cpu_features({"avx2", "fma", "f16c", "bmi1", "bmi2", "sse4_2"}) == []
    assert kernels.missing_cpu_features({"avx", "sse4_2"}) == ["avx2", "fma", "f16c", "bmi1", "bmi2"]
    assert kernels.missing_cpu_features({"avx2", "f16c", "bmi1", "bmi2"}) == ["fma"]
    assert kernels.missing_cpu_features(None) == []  # unknown: allow


def test_old_cpu_warns_once_and_disables_the_extension(fresh_state, monkeypatch):
    monkeypatch.setattr(kernels, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"sse2", "avx"})
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    with pytest.warns(RuntimeWarning, match="lacks AVX2/FMA/F16C/BMI1/BMI2: sparseland uses its PyTorch references"):
        assert kernels.extension_available() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, neither the CPU one nor "not built"
        assert kernels.extension_available() is False
        assert kernels.use_kernels() is False
        assert kernels.cpu_supports_kernels({"avx"}) is False


def test_capable_or_unknown_cpu_allows(fresh_state, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.cpu_supports_kernels({"avx2", "fma", "f16c", "bmi1", "bmi2"})
    monkeypatch.setattr(kernels, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": None)
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.cpu_supports_kernels()


def test_references_give_the_same_result_on_an_old_cpu(fresh_state, monkeypatch):
    import torch

    from sparseland.runtime.formats import BitmaskFormat

    w = torch.randn(8, 16) * (torch.rand(8, 16) > 0.5)
    x = torch.randn(2, 16)
    monkeypatch.setattr(kernels, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": {"sse2"})
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    with pytest.warns(RuntimeWarning, match="lacks"):
        y = BitmaskFormat.from_dense(w).matmul(x)
    torch.testing.assert_close(y, x @ w.T)
