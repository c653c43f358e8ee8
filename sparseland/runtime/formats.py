"""Runtime weight formats: how a Linear weight W (out, in) is laid out for the kernels.

Values are float32 or bfloat16; kernels accumulate in float32. Masks use 1 bit per weight, row by
row: row r owns ``ceil(in/8)`` bytes, bit j (LSB first) of byte k is column 8k+j (columns past
``in`` are 0). Bytes per weight at density d with value size s: dense s; bitmask 1/8 + d*s.

- ``DenseFormat``:   ``weight`` (out, in) as is; the fast dense baseline.
- ``BitmaskFormat``: unstructured. ``mask`` (out, ceil(in/8)) uint8; ``values`` the nonzeros row after
  row in column order, then 8 zeros of padding; ``row_ptr`` (out+1,) int64 offsets into ``values``.
  A CSR layout (2-byte column index per nonzero) costs 2+s bytes per nonzero and only beats the
  bitmask below 1/16 density (s=4) - not worth a second decoder for pruned LLMs, so it is not used.
- ``NMFormat``:      N:M with N/M = 1/2 (2:4, 4:8): at most N nonzeros in each group of M columns.
  ``mask`` as above, but every byte has exactly 4 bits set (groups with fewer nonzeros keep some
  zeros), so no row offsets are needed: row r's values start at r*ceil(in/8)*4. ``values`` packed
  the same way + 8 zeros. The mask *is* the per-group index (a 4-bit position set per group of 4).
  Same bytes as the bitmask at 50% (1/8 + s/2) but a cheaper decoder (fixed count per byte).
- ``ActSparseFormat``: dense ``wt`` = W^T (in, out) row-major: a zero input channel i skips the
  contiguous row wt[i]; for activation sparsity (inputs that are mostly zero).
- ``ActSparseBitmaskFormat``: W^T in the bitmask layout, one mask row per input channel: a zero input
  skips its row, a kept row reads only its nonzero weights; activation sparsity on a pruned weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseland.errors import SparselandError
from sparseland.runtime import kernels
from sparseland.runtime.packing import max_nonzeros_per_group, nm_split

VALUE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PAD = 8  # trailing zero values so kernels may load 8 at a time


def value_dtype_of(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        name = str(name).removeprefix("torch.")
    if name not in VALUE_DTYPES:
        raise SparselandError(f"value dtype {name!r} is not supported; use one of {sorted(VALUE_DTYPES)}")
    return VALUE_DTYPES[name]


def _pack_row_bits(bits: torch.Tensor) -> torch.Tensor:
    """(out, in) bool -> (out, ceil(in/8)) uint8, LSB first."""
    out, n = bits.shape
    pad = (-n) % 8
    b = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad)).view(out, -1, 8)
    return (b << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def _canonical(w: torch.Tensor, value_dtype: torch.dtype) -> torch.Tensor:
    """Contiguous copy in ``value_dtype`` with -0.0 turned into +0.0 (so it counts as a zero)."""
    return (w.detach().to(value_dtype) + 0.0).contiguous()


def _pad_values(v: torch.Tensor) -> torch.Tensor:
    return torch.cat([v.reshape(-1), v.new_zeros(PAD)])


def _popcounts(mask: torch.Tensor) -> torch.Tensor:
    """(rows, bytes) uint8 -> (rows, bytes) int64 set bits per byte."""
    return ((mask.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).sum(-1)


def _check_row_mask(kind: str, mask: torch.Tensor, cols: int, values: torch.Tensor) -> None:
    """Shared checks: a (rows, ceil(cols/8)) uint8 mask and a 1-D fp32/bf16 values tensor."""
    if not isinstance(cols, int) or cols <= 0:
        raise SparselandError(f"{kind}: {cols!r} columns; rebuild the format with from_dense")
    if mask.dtype != torch.uint8 or mask.dim() != 2 or mask.shape[1] != (cols + 7) // 8:
        raise SparselandError(
            f"{kind}: mask is {mask.dtype} {tuple(mask.shape)}, expected uint8 (rows, {(cols + 7) // 8}); "
            "rebuild the format with from_dense"
        )
    if values.dim() != 1 or values.dtype not in VALUE_DTYPES.values():
        raise SparselandError(
            f"{kind}: values are {values.dtype} {tuple(values.shape)}, expected 1-D float32 or bfloat16; "
            "rebuild the format with from_dense"
        )


def _check_bitmask(kind: str, mask: torch.Tensor, row_ptr: torch.Tensor, values: torch.Tensor, cols: int) -> None:
    """The bitmask layout's invariants (``BitmaskFormat`` and ``ActSparseBitmaskFormat``)."""
    _check_row_mask(kind, mask, cols, values)
    rows = mask.shape[0]
    if cols % 8 and bool((mask[:, -1] >> (cols % 8)).any()):
        raise SparselandError(f"{kind}: mask bits are set past column {cols}; rebuild the format with from_dense")
    if row_ptr.dtype != torch.int64 or tuple(row_ptr.shape) != (rows + 1,):
        raise SparselandError(
            f"{kind}: row_ptr is {row_ptr.dtype} {tuple(row_ptr.shape)}, expected int64 ({rows + 1},); "
            "rebuild the format with from_dense"
        )
    if int(row_ptr[0]) != 0:
        raise SparselandError(f"{kind}: row_ptr starts at {int(row_ptr[0])}, not 0; rebuild the format with from_dense")
    span = row_ptr[1:] - row_ptr[:-1]
    counts = _popcounts(mask).sum(-1)
    if bool((span != counts).any()):
        r = int((span != counts).nonzero()[0])
        raise SparselandError(
            f"{kind}: row {r} spans {int(span[r])} values in row_ptr but its mask has {int(counts[r])} bits set"
            + (" (row_ptr is not monotone)" if int(span[r]) < 0 else "")
            + "; rebuild the format with from_dense"
        )
    nnz = int(row_ptr[-1])
    if values.numel() < nnz + PAD:
        raise SparselandError(
            f"{kind}: {values.numel()} values, but row_ptr ends at nnz={nnz} and the kernels need nnz + {PAD} "
            "(padding); rebuild the format with from_dense"
        )


@dataclass
class DenseFormat:
    weight: torch.Tensor  # (out, in)
    name = "dense"

    @classmethod
    def from_dense(cls, w: torch.Tensor, value_dtype: torch.dtype = torch.float32) -> DenseFormat:
        return cls(w.detach().to(value_dtype).contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def to_dense(self) -> torch.Tensor:
        return self.weight

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        return kernels.dense_mm(self.weight, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ref_dense_mm(self.weight, x.float())

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


@dataclass
class BitmaskFormat:
    mask: torch.Tensor  # (out, ceil(in/8)) uint8
    row_ptr: torch.Tensor  # (out+1,) int64
    values: torch.Tensor  # (nnz + PAD,)
    in_features: int
    name = "bitmask"

    @classmethod
    def from_dense(cls, w: torch.Tensor, value_dtype: torch.dtype = torch.float32) -> BitmaskFormat:
        w = _canonical(w, value_dtype)
        nz = w != 0  # (out, in)
        row_ptr = torch.zeros(w.shape[0] + 1, dtype=torch.int64)
        row_ptr[1:] = nz.sum(1).cumsum(0)
        return cls(_pack_row_bits(nz), row_ptr, _pad_values(w[nz]), w.shape[1])

    def validate(self) -> BitmaskFormat:
        """Check the tensors before a kernel indexes with them (for a format built from stored tensors,
        not ``from_dense``): row_ptr starts at 0, is monotone, each row spans its mask's popcount, ends at
        nnz; no mask bits past ``in_features``; values hold nnz + 8 padding entries. Returns self."""
        _check_bitmask("bitmask format", self.mask, self.row_ptr, self.values, self.in_features)
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return (self.mask.shape[0], self.in_features)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) dense weight, float32 by default (bf16 values widen exactly; the fp32 GEMM of a long
        prefill uses it as is). C++ op when the kernels are built, else the torch reference."""
        w = kernels.bitmask_to_dense(self.mask, self.row_ptr, self.values, self.in_features)
        return w if dtype == torch.float32 else w.to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.bitmask_mm(self.mask, self.row_ptr, self.values, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ref_bitmask_mm(self.mask, self.row_ptr, self.values, x.float())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mask, self.row_ptr, self.values))


@dataclass
class NMFormat:
    mask: torch.Tensor  # (out, ceil(in/8)) uint8, 4 bits set per byte
    values: torch.Tensor  # (out * ceil(in/8) * 4 + PAD,)
    in_features: int
    n: int
    m: int
    name = "nm"

    @classmethod
    def from_dense(cls, w: torch.Tensor, value_dtype: torch.dtype = torch.float32, n: int = 2, m: int = 4) -> NMFormat:
        if 2 * n != m or 8 % m:
            raise SparselandError(f"N:M runtime format supports 1:2, 2:4 and 4:8, not {n}:{m}; use 'bitmask'")
        w = _canonical(w, value_dtype)
        out, cols = w.shape
        if cols % m or (max_nonzeros_per_group(w, m) or 0) > n:
            raise SparselandError(f"weight {tuple(w.shape)} is not {n}:{m} sparse; prune with that pattern first")
        wp = torch.nn.functional.pad(w, (0, (-cols) % 8))  # (out, in_pad); pad groups keep zeros
        vals, idx = nm_split(wp, n, m)  # (out, in_pad/m, n)
        bits = torch.zeros(out, wp.shape[1] // m, m, dtype=torch.bool)
        bits.scatter_(-1, idx, True)
        return cls(_pack_row_bits(bits.view(out, -1)), _pad_values(vals), cols, n, m)

    def validate(self) -> NMFormat:
        """Check the tensors before the kernel indexes with them: N:M with 2N = M dividing 8, every mask
        byte has exactly 4 bits set (N per group of M), values hold rows*bytes*4 + 8 entries. Returns self."""
        kind = f"{self.n}:{self.m} format"
        if (
            not (isinstance(self.n, int) and isinstance(self.m, int) and self.m > 0 and 2 * self.n == self.m)
            or 8 % self.m
        ):
            raise SparselandError(f"N:M runtime format supports 1:2, 2:4 and 4:8, not {self.n}:{self.m}; use 'bitmask'")
        _check_row_mask(kind, self.mask, self.in_features, self.values)
        bits = kernels._unpack_rows(self.mask).view(self.mask.shape[0], -1, self.m).sum(-1)
        if bool((bits != self.n).any()):
            r, g = (int(v) for v in (bits != self.n).nonzero()[0])
            raise SparselandError(
                f"{kind}: mask row {r} group {g} has {int(bits[r, g])} bits set, not {self.n} "
                "(every mask byte must have exactly 4); rebuild the format with from_dense"
            )
        need = self.mask.numel() * 4 + PAD
        if self.values.numel() < need:
            raise SparselandError(
                f"{kind}: {self.values.numel()} values, the mask needs {need} (incl. {PAD} padding); "
                "rebuild the format with from_dense"
            )
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return (self.mask.shape[0], self.in_features)

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) dense weight, float32 by default (see ``BitmaskFormat.to_dense``)."""
        w = kernels.nm4_to_dense(self.mask, self.values, self.in_features)
        return w if dtype == torch.float32 else w.to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.nm4_mm(self.mask, self.values, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ref_nm4_mm(self.mask, self.values, x.float())

    def nbytes(self) -> int:
        return self.mask.numel() + self.values.numel() * self.values.element_size()


@dataclass
class ActSparseFormat:
    wt: torch.Tensor  # (in, out) = W^T
    name = "actsparse"

    @classmethod
    def from_dense(cls, w: torch.Tensor, value_dtype: torch.dtype = torch.float32) -> ActSparseFormat:
        return cls(w.detach().to(value_dtype).T.contiguous())

    @property
    def shape(self) -> tuple[int, int]:
        return (self.wt.shape[1], self.wt.shape[0])

    def to_dense(self) -> torch.Tensor:
        return self.wt.T

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.actsparse_mm(self.wt, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ref_actsparse_mm(self.wt, x.float())

    def nbytes(self) -> int:
        return self.wt.numel() * self.wt.element_size()


@dataclass
class ActSparseBitmaskFormat:
    """Activation- and weight-sparse: W^T (in, out) as a bitmask per input row, so a zero input skips
    its row and a kept row reads only its nonzero weights (kernel ``csrc/actsparse_bitmask.cpp``).

    Byte layout (the ``BitmaskFormat`` layout of W^T):
    - ``mask`` (in, ceil(out/8)) uint8: bit j (LSB first) of byte k of row i is set iff W[8k+j, i] != 0;
      bits past ``out`` are 0.
    - ``row_ptr`` (in+1,) int64: row i's values are ``values[row_ptr[i]:row_ptr[i+1]]``.
    - ``values`` (nnz + 8,) fp32 or bf16: the nonzeros of W^T row after row, in output order, then 8
      zeros (the kernel loads 8 values at a time).
    Bytes: in*ceil(out/8) + 8*(in+1) + (nnz+8)*s, i.e. about 1/8 + d*s per weight at density d (s=4:
    smaller than ``actsparse`` below ~97% density; at 50%, 2.125 vs 4 bytes).
    """

    mask: torch.Tensor  # (in, ceil(out/8)) uint8
    row_ptr: torch.Tensor  # (in+1,) int64
    values: torch.Tensor  # (nnz + PAD,)
    out_features: int
    name = "actsparse_bitmask"

    @classmethod
    def from_dense(cls, w: torch.Tensor, value_dtype: torch.dtype = torch.float32) -> ActSparseBitmaskFormat:
        bm = BitmaskFormat.from_dense(w.detach().T, value_dtype)  # rows of W^T = input channels
        return cls(bm.mask, bm.row_ptr, bm.values, w.shape[0])

    @staticmethod
    def predicted_nbytes(w: torch.Tensor, value_dtype: torch.dtype = torch.float32) -> int:
        """``nbytes()`` of ``from_dense(w, value_dtype)`` without building it."""
        out, inp = w.shape
        nnz = int((_canonical(w, value_dtype) != 0).sum())
        s = torch.empty((), dtype=value_dtype).element_size()
        return inp * ((out + 7) // 8) + 8 * (inp + 1) + (nnz + PAD) * s

    def validate(self) -> ActSparseBitmaskFormat:
        """The ``BitmaskFormat.validate`` checks on W^T (rows = input channels). Returns self."""
        _check_bitmask("actsparse_bitmask format", self.mask, self.row_ptr, self.values, self.out_features)
        return self

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.mask.shape[0])

    def to_dense(self) -> torch.Tensor:
        return BitmaskFormat(self.mask, self.row_ptr, self.values, self.out_features).to_dense().T

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.actsparse_bitmask_mm(self.mask, self.row_ptr, self.values, x, self.out_features)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.ref_actsparse_bitmask_mm(self.mask, self.row_ptr, self.values, x.float(), self.out_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.mask, self.row_ptr, self.values))


WeightFormat = DenseFormat | BitmaskFormat | NMFormat | ActSparseFormat | ActSparseBitmaskFormat
FORMATS = {
    "dense": DenseFormat,
    "bitmask": BitmaskFormat,
    "nm": NMFormat,
    "actsparse": ActSparseFormat,
    "actsparse_bitmask": ActSparseBitmaskFormat,
}


def make_act_format(
    w: torch.Tensor, value_dtype: torch.dtype = torch.float32
) -> ActSparseFormat | ActSparseBitmaskFormat:
    """Format for a layer with sparse inputs: ``actsparse_bitmask`` if it is smaller than ``actsparse``
    (the weight has enough zeros: below ~97% density for fp32, ~94% for bf16), else ``actsparse``."""
    dense_bytes = w.numel() * torch.empty((), dtype=value_dtype).element_size()
    if ActSparseBitmaskFormat.predicted_nbytes(w, value_dtype) < dense_bytes:
        return ActSparseBitmaskFormat.from_dense(w, value_dtype)
    return ActSparseFormat.from_dense(w, value_dtype)


def make_format(w: torch.Tensor, format: str = "auto", value_dtype: torch.dtype = torch.float32) -> WeightFormat:
    """Build a runtime format; ``auto`` picks N:M (2:4 / 4:8) when W is exactly that, else the smaller
    of bitmask and dense (bitmask wins below ~97% density for fp32, ~94% for bf16)."""
    if format == "auto":
        w = _canonical(w, w.dtype)
        for n, m in ((2, 4), (4, 8)):
            if w.shape[1] % m == 0 and (max_nonzeros_per_group(w, m) or m) <= n:
                return NMFormat.from_dense(w, value_dtype, n, m)
        bm = BitmaskFormat.from_dense(w, value_dtype)
        dense_bytes = w.numel() * torch.empty((), dtype=value_dtype).element_size()
        return bm if bm.nbytes() < dense_bytes else DenseFormat.from_dense(w, value_dtype)
    if format.count(":") == 1:
        n, m = (int(v) for v in format.split(":"))
        return NMFormat.from_dense(w, value_dtype, n, m)
    if format not in FORMATS:
        raise SparselandError(
            f"unknown runtime format {format!r}; use auto, dense, bitmask, 2:4, 4:8, actsparse or actsparse_bitmask"
        )
    return FORMATS[format].from_dense(w, value_dtype)
