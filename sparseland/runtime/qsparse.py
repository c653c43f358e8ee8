"""Sparse + 4-bit runtime formats: the kept entries of a pruned weight as 4-bit codes (kernels in
``csrc/qsparse.cpp``; layout, math and the single-vector C++ contract in ``csrc/qsparse.h``).

A weight W (out, in) comes from a :class:`~sparseland.quant.scheme.QuantizedWeight` with a mask::

    W[r, c] = d[r, c // g] * q[r, c] + m[r, c // g]   (kept),   +0.0 (pruned)

with 4-bit codes ``q``, float16 ``d`` / ``m`` per row and group of ``g`` columns (g in 32, 64, 128; a
symmetric scheme stores no ``m``: it is -8 d). Groups run over columns, also here.

Stored tensors (``mask`` as in ``formats.py``: (out, in/8) uint8, bit j LSB first of byte k = column
8k + j; ``in`` is a multiple of the group, hence of 32):

- ``Q4NMFormat`` ("q4_nm"; 2:4 or 4:8): every mask byte has exactly 4 bits set, so each row keeps in/2
  codes, stored in ``codes`` (out, in/4) uint8. A group of M columns with fewer than N kept entries
  keeps extra positions: symmetric schemes give them code 8 (exactly +0.0); asymmetric ones cannot
  store an exact zero, so ``from_quantized`` rejects such a mask and ``from_dense`` quantizes the
  filler zeros as kept entries (their values are within half a step of 0).
- ``Q4BitmaskFormat`` ("q4_bitmask"; unstructured): ``codes`` 1-D uint8, row r's kept codes in bytes
  ``row_ptr[r]:row_ptr[r+1]`` (``row_ptr`` (out+1,) int64), ceil(popcount(row)/2) bytes, no padding.

Code layout inside a row ("chunked nibbles"): the row's kept codes in column order are split into
chunks of 64 (the last may be shorter, n codes); a chunk takes h = ceil(n/2) bytes, byte i holds code
i in its low nibble and code i + h in its high nibble. (A full chunk unpacks with one AND and one shift
into 64 bytes in order.)

Bytes per weight at density p, group g: 1/8 (mask) + p/2 (codes) + 2/g (sym) or 4/g (asym), plus
8/in (row_ptr) for the bitmask; e.g. 2:4 g64 asym: 0.4375, vs dense Q4_1 g32 0.5625.

The kernels quantize x per block of 32 columns to int8 (``quantize_x_q8``); the references here
(used when the kernels are off) multiply float x with the float weight. ``ref_q8_mm`` reproduces the
kernels' arithmetic up to float32 summation order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseland.errors import SparselandError
from sparseland.quant.scheme import QuantizedWeight, QuantScheme, dequantize, quantize_rtn
from sparseland.runtime import kernels

KERNEL_GROUPS = (32, 64, 128)
XBLOCK = 32  # columns per int8 block of x in the kernels


# ----- packing ---------------------------------------------------------------------------------------


def _unpack_mask(mask: torch.Tensor) -> torch.Tensor:
    return kernels._unpack_rows(mask)  # (out, in) bool


def _nibble_slots(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For rows with ``counts`` (out,) kept codes: row_ptr (out+1,) byte offsets and, for every kept code
    in row-major order, its byte index (into the packed array) and whether it is the high nibble."""
    counts = counts.to(torch.int64)
    row_ptr = torch.zeros(counts.numel() + 1, dtype=torch.int64)
    row_ptr[1:] = ((counts + 1) // 2).cumsum(0)
    total = int(counts.sum())
    row = torch.repeat_interleave(torch.arange(counts.numel()), counts)  # (total,)
    starts = torch.zeros_like(counts)
    starts[1:] = counts.cumsum(0)[:-1]
    rank = torch.arange(total) - starts[row]  # index of the code within its row
    chunk, j = rank // 64, rank % 64
    h = (torch.clamp(counts[row] - 64 * chunk, max=64) + 1) // 2  # bytes of this chunk
    high = j >= h
    byte = row_ptr[row] + 32 * chunk + torch.where(high, j - h, j)
    return row_ptr, byte, high


def pack_codes(kept: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept codes (total,) uint8 (row after row, column order), ``counts`` (out,) -> (packed bytes
    (row_ptr[-1],) uint8, row_ptr (out+1,) int64) in the chunked-nibble layout."""
    row_ptr, byte, high = _nibble_slots(counts)
    packed = torch.zeros(int(row_ptr[-1]), dtype=torch.int64)
    packed.scatter_add_(0, byte, kept.to(torch.int64) << (4 * high.to(torch.int64)))
    return packed.to(torch.uint8), row_ptr


def unpack_codes(packed: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (total,) uint8 kept codes."""
    _, byte, high = _nibble_slots(counts)
    return (packed.reshape(-1)[byte].to(torch.int64) >> (4 * high.to(torch.int64))).bitwise_and(15).to(torch.uint8)


def _check_scheme(qw: QuantizedWeight) -> int:
    if qw.scheme.bits != 4:
        raise SparselandError(f"{qw.scheme.name}: sparse 4-bit formats need a 4-bit scheme")
    g = qw.group
    if g not in KERNEL_GROUPS:
        raise SparselandError(f"{qw.scheme.name}: group size {g} is not supported; use 32, 64 or 128 columns")
    if qw.mask is None:
        raise SparselandError("sparse 4-bit formats need QuantizedWeight.mask (which entries are kept)")
    return g


def _dense_codes(mask: torch.Tensor, kept: torch.Tensor, in_features: int) -> torch.Tensor:
    bits = _unpack_mask(mask)[:, :in_features]
    q = torch.zeros(bits.shape, dtype=torch.uint8)
    q[bits] = kept
    return q


# ----- x quantization and references -----------------------------------------------------------------


def quantize_x_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' x quantization: (B, in) float32 -> xq (B, in) int8 and s (B, in/32) float32 with
    s = amax / 127 and xq = round_half_even(x * (127 / amax)) per block of 32 columns (0 if amax == 0)."""
    B, n = x.shape
    xb = x.float().reshape(B, n // XBLOCK, XBLOCK)
    amax = xb.abs().amax(-1)  # (B, nb)
    s = amax / 127.0
    # a true division, as the kernels do (torch turns `127.0 / t` into 127 * reciprocal(t), which can be one ulp
    # off and flip a round-half-even tie such as 60.5)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    inv = torch.where(amax > 0, torch.full_like(amax, 127.0) / safe, torch.zeros_like(amax))
    xq = torch.round(xb * inv.unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return xq.reshape(B, n), s


def ref_q8_mm(
    codes: torch.Tensor, keep: torch.Tensor, d: torch.Tensor, m: torch.Tensor, x: torch.Tensor
) -> torch.Tensor:
    """The kernels' arithmetic in float64: codes (out, in) (0 where not kept), keep (out, in) bool,
    d / m (out, G) float32, x (B, in) -> (B, out) = sum_b s_b (d_G Q_b + m_G S_b) with Q_b = sum q xq and
    S_b = sum_kept xq over block b of 32 columns."""
    out, n = codes.shape
    xq, s = quantize_x_q8(x)
    xq = xq.double()
    nb = n // XBLOCK
    qb = torch.einsum("rbc,xbc->xrb", codes.double().reshape(out, nb, XBLOCK), xq.reshape(-1, nb, XBLOCK))
    sb = torch.einsum("rbc,xbc->xrb", keep.double().reshape(out, nb, XBLOCK), xq.reshape(-1, nb, XBLOCK))
    g = n // d.shape[1]
    dl = d.double().repeat_interleave(g // XBLOCK, dim=1)  # (out, nb)
    ml = m.double().repeat_interleave(g // XBLOCK, dim=1)
    return ((dl * qb + ml * sb) * s.double().unsqueeze(1)).sum(-1)  # (B, out)


def _weight(codes, keep, scale, offset, in_features, group) -> torch.Tensor:
    scheme = QuantScheme(4, group, offset is None)
    return dequantize(codes, scale, offset, scheme, keep)


def ref_q4nm_mm(mask, codes, scale, offset, x) -> torch.Tensor:
    """Float reference: x @ W^T with the dequantized weight (float32)."""
    out, n = mask.shape[0], mask.shape[1] * 8
    keep = _unpack_mask(mask)
    q = _dense_codes(mask, unpack_codes(codes, torch.full((out,), n // 2)), n)
    return x.float() @ _weight(q, keep, scale, offset, n, n // scale.shape[1]).T


def ref_q4bitmask_mm(mask, row_ptr, codes, scale, offset, x) -> torch.Tensor:
    n = mask.shape[1] * 8
    keep = _unpack_mask(mask)
    q = _dense_codes(mask, unpack_codes(codes, keep.sum(1)), n)
    return x.float() @ _weight(q, keep, scale, offset, n, n // scale.shape[1]).T


def q4nm_mm(mask, codes, scale, offset, x) -> torch.Tensor:
    """x (B, in) -> (B, out) for a ``Q4NMFormat`` weight (the C++ kernel quantizes x to int8 per 32)."""
    x = kernels._prep(x)
    if kernels.use_kernels():
        return torch.ops.sparseland.q4nm_mm(mask, codes, scale, offset, x)
    return ref_q4nm_mm(mask, codes, scale, offset, x)


def q4bitmask_mm(mask, row_ptr, codes, scale, offset, x) -> torch.Tensor:
    """x (B, in) -> (B, out) for a ``Q4BitmaskFormat`` weight."""
    x = kernels._prep(x)
    if kernels.use_kernels():
        return torch.ops.sparseland.q4bitmask_mm(mask, row_ptr, codes, scale, offset, x)
    return ref_q4bitmask_mm(mask, row_ptr, codes, scale, offset, x)


# ----- formats ---------------------------------------------------------------------------------------


def _pack_row_bits(bits: torch.Tensor) -> torch.Tensor:
    out, n = bits.shape
    b = bits.to(torch.uint8).view(out, n // 8, 8)
    return (b << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def _nm_fill(mask: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """mask (out, in) bool with <= n kept per group of m -> (mask with exactly n per group, filler positions)."""
    out, cols = mask.shape
    g = mask.reshape(out, cols // m, m)
    kept = g.sum(-1, keepdim=True)
    if int(kept.max()) > n:
        raise SparselandError(f"mask is not {n}:{m}: a group of {m} columns keeps {int(kept.max())} > {n} entries")
    free_rank = (~g).cumsum(-1)  # 1-based rank of each pruned position in its group
    fill = ~g & (free_rank <= n - kept)
    return (g | fill).reshape(out, cols), fill.reshape(out, cols)


@dataclass
class Q4NMFormat:
    mask: torch.Tensor  # (out, in/8) uint8, 4 bits set per byte
    codes: torch.Tensor  # (out, in/4) uint8, in/2 codes per row, chunked nibbles
    scale: torch.Tensor  # (out, in/g) float16
    offset: torch.Tensor | None  # (out, in/g) float16, None: symmetric (m = -8 d)
    in_features: int
    n: int = 2
    m: int = 4
    name = "q4_nm"
    multi_row_kernel = True  # prefill runs the kernel (several x rows per weight row), no dense rebuild

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, n: int = 2, m: int = 4) -> Q4NMFormat:
        if 2 * n != m or 8 % m:
            raise SparselandError(f"q4_nm supports 2:4 and 4:8 (4 kept per 8 columns), not {n}:{m}")
        _check_scheme(qw)
        out, cols = qw.shape
        full, fill = _nm_fill(qw.mask.bool(), n, m)
        codes = qw.codes
        if bool(fill.any()):
            if not qw.scheme.symmetric:
                raise SparselandError(
                    f"{qw.scheme.name}: some groups of {m} keep fewer than {n} entries, and an asymmetric "
                    "scheme cannot store an exact zero; use q4_bitmask, a symmetric scheme or Q4NMFormat.from_dense"
                )
            codes = torch.where(fill, torch.full_like(codes, 8), codes)  # d * 8 - 8 d == +0.0 exactly
        packed, _ = pack_codes(codes[full], torch.full((out,), cols // 2))
        return cls(_pack_row_bits(full), packed.view(out, cols // 4), qw.scale, qw.offset, cols, n, m)

    @classmethod
    def from_dense(cls, w: torch.Tensor, scheme: QuantScheme | str = "int4-g64", n: int = 2, m: int = 4) -> Q4NMFormat:
        """Quantize the nonzeros of an N:M-pruned ``w`` (``quantize_rtn(w, scheme, mask=w != 0)``); for an
        asymmetric scheme, groups with fewer than n nonzeros get filler zeros quantized as kept entries."""
        scheme = QuantScheme.parse(scheme)
        w = w.detach().float()
        mask = w != 0
        if not scheme.symmetric and w.shape[1] % m == 0:
            mask, _ = _nm_fill(mask, n, m)
        return cls.from_quantized(quantize_rtn(w, scheme, mask=mask), n, m)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.mask.shape[0], self.in_features)

    @property
    def group(self) -> int:
        return self.in_features // self.scale.shape[1]

    def to_dense(self) -> torch.Tensor:
        out = self.mask.shape[0]
        keep = _unpack_mask(self.mask)
        q = _dense_codes(
            self.mask, unpack_codes(self.codes, torch.full((out,), self.in_features // 2)), self.in_features
        )
        return _weight(q, keep, self.scale, self.offset, self.in_features, self.group)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        return q4nm_mm(self.mask, self.codes, self.scale, self.offset, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return ref_q4nm_mm(self.mask, self.codes, self.scale, self.offset, x.float())

    def nbytes(self) -> int:
        ts = [self.mask, self.codes, self.scale] + ([self.offset] if self.offset is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class Q4BitmaskFormat:
    mask: torch.Tensor  # (out, in/8) uint8
    row_ptr: torch.Tensor  # (out+1,) int64 byte offsets into codes
    codes: torch.Tensor  # (row_ptr[-1],) uint8, chunked nibbles per row
    scale: torch.Tensor  # (out, in/g) float16
    offset: torch.Tensor | None  # (out, in/g) float16, None: symmetric
    in_features: int
    name = "q4_bitmask"
    multi_row_kernel = True  # prefill runs the kernel (several x rows per weight row), no dense rebuild

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> Q4BitmaskFormat:
        _check_scheme(qw)
        keep = qw.mask.bool()
        packed, row_ptr = pack_codes(qw.codes[keep], keep.sum(1))
        return cls(_pack_row_bits(keep), row_ptr, packed, qw.scale, qw.offset, qw.shape[1])

    @classmethod
    def from_dense(cls, w: torch.Tensor, scheme: QuantScheme | str = "int4-g64") -> Q4BitmaskFormat:
        w = w.detach().float()
        return cls.from_quantized(quantize_rtn(w, scheme, mask=w != 0))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.mask.shape[0], self.in_features)

    @property
    def group(self) -> int:
        return self.in_features // self.scale.shape[1]

    def to_dense(self) -> torch.Tensor:
        keep = _unpack_mask(self.mask)
        q = _dense_codes(self.mask, unpack_codes(self.codes, keep.sum(1)), self.in_features)
        return _weight(q, keep, self.scale, self.offset, self.in_features, self.group)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return q4bitmask_mm(self.mask, self.row_ptr, self.codes, self.scale, self.offset, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return ref_q4bitmask_mm(self.mask, self.row_ptr, self.codes, self.scale, self.offset, x.float())

    def nbytes(self) -> int:
        ts = [self.mask, self.row_ptr, self.codes, self.scale] + ([self.offset] if self.offset is not None else [])
        return sum(t.numel() * t.element_size() for t in ts)


QSPARSE_FORMATS = {"q4_nm": Q4NMFormat, "q4_bitmask": Q4BitmaskFormat}
