"""Kernel dispatch: the C++ ops in ``torch.ops.sparseland`` or their pure-PyTorch references.

Every op has a reference here that computes the same result from the same stored tensors. Force
the references with ``SPARSELAND_FORCE_REFERENCE=1`` or ``with force_reference(): ...``. If the
extension ``sparseland.runtime._C`` is missing, the references run, with a one-time warning.

All ops: ``x`` (B, in) float32 -> (B, out) float32, accumulation in float32.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

_state: dict[str, bool | None] = {"loaded": None, "forced": False, "warned": False, "cpu_warned": False}


REQUIRED_CPU_FLAGS = ("avx2", "fma", "f16c", "bmi1", "bmi2")  # -march=haswell: the compiler may emit any of these


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str] | None:
    """The CPU feature flags listed in ``/proc/cpuinfo``, or None when unknown (not Linux, unreadable)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        return None
    return None


def missing_cpu_features(flags: set[str] | None) -> list[str]:
    """Required features absent from ``flags`` (None = unknown: assume present, so nothing is missing)."""
    if flags is None:
        return []
    return [f for f in REQUIRED_CPU_FLAGS if f not in flags]


def cpu_supports_kernels(flags: set[str] | None = None, *, warn: bool = True) -> bool:
    """Whether this CPU can run the compiled kernels (else they would die with SIGILL); warns once if not."""
    import platform

    if flags is None and platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        flags = cpu_flags()
    missing = missing_cpu_features(flags)
    if missing and warn and not _state["cpu_warned"]:
        _state["cpu_warned"] = True
        warnings.warn(
            f"this CPU lacks {'/'.join(f.upper() for f in missing)}: sparseland uses its PyTorch references, "
            "slower but correct",
            RuntimeWarning,
            stacklevel=3,
        )
    return not missing


def extension_available() -> bool:
    """True if the compiled kernels import (tried once) and the CPU has the features they use."""
    if _state["loaded"] is None:
        if not cpu_supports_kernels():
            _state["loaded"] = False
            _state["warned"] = True  # the CPU warning said why; no second "not built" warning
            return False
        try:
            import sparseland.runtime._C  # noqa: F401  (registers torch.ops.sparseland.*)

            _state["loaded"] = True
        except ImportError:
            _state["loaded"] = False
    return bool(_state["loaded"])


def use_kernels() -> bool:
    """Whether the C++ kernels run now (not forced off, and built)."""
    if _state["forced"] or os.environ.get("SPARSELAND_FORCE_REFERENCE", "") not in ("", "0"):
        return False
    if extension_available():
        return True
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(
            "sparseland's C++ kernels (sparseland.runtime._C) are not built; using the slow PyTorch "
            "references. Rebuild with `pip install --no-build-isolation -e .`",
            RuntimeWarning,
            stacklevel=3,
        )
    return False


@contextlib.contextmanager
def force_reference(enabled: bool = True) -> Iterator[None]:
    """Run the pure-PyTorch references inside the block."""
    old = _state["forced"]
    _state["forced"] = enabled
    try:
        yield
    finally:
        _state["forced"] = old


def _unpack_rows(mask: torch.Tensor) -> torch.Tensor:
    """(out, in8) uint8 -> (out, in8*8) bool, bit j of byte k is column 8k+j."""
    shifts = torch.arange(8, dtype=torch.uint8)
    return ((mask.unsqueeze(-1) >> shifts) & 1).bool().reshape(mask.shape[0], -1)


# ----- references -----------------------------------------------------------------------------------


def ref_dense_mm(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ w.float().T  # (B, in) @ (in, out)


def ref_bitmask_mm(mask: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bits = _unpack_rows(mask)  # (out, in_pad)
    w = torch.zeros(bits.shape, dtype=torch.float32)
    w[bits] = values[: int(row_ptr[-1])].float()
    return x @ w[:, : x.shape[1]].T


def ref_nm4_mm(mask: torch.Tensor, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bits = _unpack_rows(mask)
    w = torch.zeros(bits.shape, dtype=torch.float32)
    w[bits] = values[: int(bits.sum())].float()
    return x @ w[:, : x.shape[1]].T


def ref_actsparse_mm(wt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x @ wt.float()  # (B, in) @ (in, out); zero inputs contribute nothing


def ref_actsparse_bitmask_mm(
    mask: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, x: torch.Tensor, out: int
) -> torch.Tensor:
    bits = _unpack_rows(mask)  # (in, out_pad): row i of W^T
    wt = torch.zeros(bits.shape, dtype=torch.float32)
    wt[bits] = values[: int(row_ptr[-1])].float()
    act = (x != 0).any(0)  # (in,) inputs nonzero in some batch row; the others skip their row
    return x[:, act] @ wt[act, :out]  # (B, na) @ (na, out)


def ref_bitmask_to_dense(
    mask: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, in_features: int
) -> torch.Tensor:
    """(out, in_features) float32 dense weight of a bitmask layout (bf16 values widen exactly)."""
    bits = _unpack_rows(mask)[:, :in_features]
    w = torch.zeros(bits.shape, dtype=torch.float32)
    w[bits] = values[: int(row_ptr[-1])].float()
    return w


def ref_nm4_to_dense(mask: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, in_features) float32 dense weight of a 4-per-byte N:M layout."""
    bits = _unpack_rows(mask)
    w = torch.zeros(bits.shape, dtype=torch.float32)
    w[bits] = values[: int(bits.sum())].float()
    return w[:, :in_features].contiguous()


# ----- dispatch -------------------------------------------------------------------------------------


def _prep(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float32).contiguous()


def dense_mm(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(out, in) fp32/bf16 weight, (B, in) -> (B, out)."""
    x = _prep(x)
    return torch.ops.sparseland.dense_mm(w, x) if use_kernels() else ref_dense_mm(w, x)


def bitmask_mm(mask: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x = _prep(x)
    if use_kernels():
        return torch.ops.sparseland.bitmask_mm(mask, row_ptr, values, x)
    return ref_bitmask_mm(mask, row_ptr, values, x)


def nm4_mm(mask: torch.Tensor, values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x = _prep(x)
    return torch.ops.sparseland.nm4_mm(mask, values, x) if use_kernels() else ref_nm4_mm(mask, values, x)


def actsparse_mm(wt: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(in, out) W^T, (B, in) mostly-zero inputs -> (B, out); rows of W^T for zero inputs are skipped."""
    x = _prep(x)
    return torch.ops.sparseland.actsparse_mm(wt, x) if use_kernels() else ref_actsparse_mm(wt, x)


def actsparse_bitmask_mm(
    mask: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, x: torch.Tensor, out: int
) -> torch.Tensor:
    """W^T stored as a bitmask per input row, (B, in) mostly-zero inputs -> (B, out): skips zero inputs'
    rows and zero weights."""
    x = _prep(x)
    if use_kernels():
        return torch.ops.sparseland.actsparse_bitmask_mm(mask, row_ptr, values, x, out)
    return ref_actsparse_bitmask_mm(mask, row_ptr, values, x, out)


def bitmask_to_dense(mask: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """Bitmask layout -> (out, in_features) float32 (the C++ op checks the layout and runs in parallel)."""
    if use_kernels():
        return torch.ops.sparseland.bitmask_to_dense(mask, row_ptr, values, in_features)
    return ref_bitmask_to_dense(mask, row_ptr, values, in_features)


def nm4_to_dense(mask: torch.Tensor, values: torch.Tensor, in_features: int) -> torch.Tensor:
    """4-per-byte N:M layout -> (out, in_features) float32."""
    if use_kernels():
        return torch.ops.sparseland.nm4_to_dense(mask, values, in_features)
    return ref_nm4_to_dense(mask, values, in_features)
