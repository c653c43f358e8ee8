"""Dense quantized runtime formats: how a quantized Linear weight W (out, in) is laid out for the
kernels in ``csrc/qdense.cpp`` (single-vector entry points in ``csrc/qmatvec.h``).

- ``Q4DenseFormat`` (``q4``): 4-bit codes, one float16 scale (and offset, if asymmetric) per row and
  group of ``group`` in {32, 64, 128} columns. ``codes`` (out, in/2) uint8: per row, each block of 32
  columns is 16 bytes; byte j holds code[j] in the low nibble and code[j + 16] in the high nibble
  (llama.cpp's Q4_0 / Q4_1 block order). ``scale`` (out, in/group) float16; ``offset`` (out, in/group)
  float16, or None for a symmetric scheme (offset = -8 * scale). W = scale * code + offset, computed
  exactly as ``QuantizedWeight.dequantize``. Bytes per weight: 1/2 + 2/group (+ 2/group asymmetric):
  0.5625 (g32 sym), 0.625 (g32 asym), 0.5625 (g64 asym), 0.53125 (g128 asym).
- ``Q8DenseFormat`` (``q8``): symmetric int8, one float16 scale per output channel (scheme ``int8``) or
  per row and group of 32/64/128 columns (``int8-g32``: llama.cpp's Q8_0 grid). ``codes`` (out, in) int8 =
  code - 128, ``scale`` (out, 1) or (out, in/group) float16: W = scale * codes. 1 (+ 2/group) bytes per weight.

The kernels quantize x per block of 32 columns to int8 (scale max|x|/127, round half to even) and
take integer dot products (llama.cpp's Q4_1 x Q8_1), so ``matmul`` differs from ``x @ to_dense().T``
by the x rounding (~1e-2 of the output's norm). ``reference`` (``ref_q4_mm`` / ``ref_q8_mm``) computes
the kernels' math in float64 PyTorch from the same stored tensors; ``ref_*_float`` the float product.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparseland.errors import SparselandError
from sparseland.quant.scheme import QuantizedWeight, QuantScheme, dequantize, quantize_rtn
from sparseland.runtime import kernels

Q4_GROUPS = (32, 64, 128)
BLOCK = 32  # columns per x quantization block (and per 16-byte Q4 code block)


# ----- packing ----------------------------------------------------------------------------------------


def pack_q4(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) uint8 codes in [0, 16), in % 32 == 0 -> (out, in/2) uint8 in the Q4 block order."""
    out, inp = codes.shape
    c = codes.to(torch.uint8).reshape(out, inp // BLOCK, 2, BLOCK // 2)  # (out, blocks, lo/hi, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(out, inp // 2).contiguous()


def unpack_q4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in/2) uint8 -> (out, in) uint8 codes (inverse of ``pack_q4``)."""
    out, half = packed.shape
    p = packed.reshape(out, half // (BLOCK // 2), 1, BLOCK // 2)
    return torch.cat([p & 0x0F, p >> 4], dim=2).reshape(out, 2 * half)


# ----- references ---------------------------------------------------------------------------------------


def quantize_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' x quantization: (B, in) float32 -> int8 values as float32 (B, nblk, 32) (zero padded
    to whole blocks) and float32 block scales dx (B, nblk). ``dx = max|x|/127``; ``xq = round(x * (127 /
    max|x|))``, half to even, 0 for an all-zero block (float32 arithmetic, as in the kernels)."""
    x = x.float()
    B, inp = x.shape
    xb = torch.nn.functional.pad(x, (0, (-inp) % BLOCK)).reshape(B, -1, BLOCK)
    amax = xb.abs().amax(-1)
    dx = amax / 127.0
    inv = torch.where(amax != 0, torch.tensor(127.0) / torch.where(amax != 0, amax, 1.0), 0.0)
    return torch.round(xb * inv.unsqueeze(-1)), dx


def ref_q4_mm(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int, x: torch.Tensor
) -> torch.Tensor:
    """The Q4 kernel's math in float64: sum_k d_g(k) dx_k sum_c q xq + sum_g m_g S_g, with S_g =
    sum_{k in g} dx_k sum_c xq the sum of the *rounded* x (llama.cpp's Q8_1 ``s``): W @ x_rounded exactly.
    (The exact float sum of x would leave the error sum (W - m)(x - x_rounded), several times larger:
    ``benchmarks/ablate_q4_offset.py``.)"""
    q = unpack_q4(codes).double()  # (out, in)
    out, inp = q.shape
    xq, dx = quantize_x(x)  # (B, nblk, 32), (B, nblk)
    B, nblk = dx.shape
    isum = torch.einsum("bkc,okc->bok", xq.double(), q.reshape(out, nblk, BLOCK))  # exact integers
    d = scale.double().repeat_interleave(group // BLOCK, dim=1)  # (out, nblk)
    y = (isum * dx.double().unsqueeze(1) * d.unsqueeze(0)).sum(-1)  # (B, out)
    m = -8.0 * scale.double() if offset is None else offset.double()  # (out, G)
    sx = (xq.double().sum(-1) * dx.double()).reshape(B, inp // group, group // BLOCK).sum(-1)  # (B, G)
    return (y + sx @ m.T).float()


def ref_q8_mm(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The Q8 kernel's math in float64: sum_k d_k dx_k sum_c w xq, with d_k the row's scale (one per row)
    or its block's group scale."""
    out, inp = codes.shape
    xq, dx = quantize_x(x)
    nblk = dx.shape[1]
    w = torch.nn.functional.pad(codes.double(), (0, nblk * BLOCK - inp)).reshape(out, nblk, BLOCK)
    isum = torch.einsum("bkc,okc->bok", xq.double(), w)
    d = scale.double().reshape(out, -1)
    d = d.expand(out, nblk) if d.shape[1] == 1 else d.repeat_interleave(nblk // d.shape[1], dim=1)
    return (isum * dx.double().unsqueeze(1) * d.unsqueeze(0)).sum(-1).float()


def ref_q4_mm_float(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int, x: torch.Tensor
) -> torch.Tensor:
    """x @ W^T with the dequantized float32 weight (no x rounding)."""
    scheme = QuantScheme(4, group, offset is None)
    return x.float() @ dequantize(unpack_q4(codes), scale, offset, scheme).T


def ref_q8_mm_float(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return x.float() @ _q8_dense(codes, scale).T


def _q8_dense(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    u = (codes.to(torch.int16) + 128).to(torch.uint8)
    scale = scale.reshape(codes.shape[0], -1)
    return dequantize(u, scale, None, _q8_scheme(codes.shape[1], scale.shape[1]))


def _q8_scheme(inp: int, groups: int) -> QuantScheme:
    return QuantScheme(8, 0 if groups == 1 else inp // groups, True)


# ----- dispatch ------------------------------------------------------------------------------------------


def q4_mm(
    codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, group: int, x: torch.Tensor
) -> torch.Tensor:
    """Q4 weight (codes (out, in/2), scale/offset (out, in/group)), x (B, in) -> (B, out) float32."""
    x = x.to(torch.float32).contiguous()
    if kernels.use_kernels():
        return torch.ops.sparseland.q4_mm(codes, scale, offset, group, x)
    return ref_q4_mm(codes, scale, offset, group, x)


def q8_mm(codes: torch.Tensor, scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Q8 weight (codes (out, in) int8, scale (out, 1) or (out, in/group)), x (B, in) -> (B, out) float32."""
    x = x.to(torch.float32).contiguous()
    if kernels.use_kernels():
        return torch.ops.sparseland.q8_mm(codes, scale, x)
    return ref_q8_mm(codes, scale, x)


def quant_isa() -> str:
    """The instruction set the quantized kernels use in this process: ``avx512vnni`` or ``avx2``."""
    return str(torch.ops.sparseland.quant_isa()) if kernels.use_kernels() else "reference"


# ----- formats -------------------------------------------------------------------------------------------


def _dense_only(qw: QuantizedWeight) -> None:
    if qw.mask is not None:
        raise SparselandError("a pruned QuantizedWeight (with a mask) needs a sparse format, not a dense q4/q8 one")


@dataclass
class Q4DenseFormat:
    codes: torch.Tensor  # (out, in/2) uint8, Q4 block order
    scale: torch.Tensor  # (out, in/group) float16
    offset: torch.Tensor | None  # (out, in/group) float16, None = symmetric
    group: int
    name = "q4"
    multi_row_kernel = True  # prefill runs the kernel (several x rows per weight row), no dense rebuild

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> Q4DenseFormat:
        _dense_only(qw)
        s = qw.scheme
        out, inp = qw.shape
        g = s.group or inp
        if s.bits != 4 or g not in Q4_GROUPS or inp % g:
            raise SparselandError(
                f"q4 format supports int4 with groups of {Q4_GROUPS} columns dividing in_features, "
                f"not {s.name} on {inp} columns"
            )
        off = None if qw.offset is None else qw.offset.to(torch.float16).contiguous()
        return cls(pack_q4(qw.codes), qw.scale.to(torch.float16).contiguous(), off, g)

    @classmethod
    def from_dense(cls, w: torch.Tensor, scheme: QuantScheme | str = "int4-g32") -> Q4DenseFormat:
        return cls.from_quantized(quantize_rtn(w, scheme))

    @property
    def scheme(self) -> QuantScheme:
        return QuantScheme(4, self.group, self.offset is None)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.codes.shape[0], self.codes.shape[1] * 2)

    def to_dense(self) -> torch.Tensor:
        return dequantize(unpack_q4(self.codes), self.scale, self.offset, self.scheme)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, out)
        return q4_mm(self.codes, self.scale, self.offset, self.group, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return ref_q4_mm(self.codes, self.scale, self.offset, self.group, x.float())

    def nbytes(self) -> int:
        ts = [self.codes, self.scale] + ([] if self.offset is None else [self.offset])
        return sum(t.numel() * t.element_size() for t in ts)


@dataclass
class Q8DenseFormat:
    codes: torch.Tensor  # (out, in) int8 = code - 128
    scale: torch.Tensor  # (out, 1) or (out, in/group) float16
    name = "q8"
    multi_row_kernel = True  # prefill runs the kernel (several x rows per weight row), no dense rebuild

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight) -> Q8DenseFormat:
        _dense_only(qw)
        s = qw.scheme
        if s.bits != 8 or not s.symmetric:
            raise SparselandError(
                f"q8 format supports symmetric int8, one scale per output channel (int8) or per group "
                f"(int8-g32 / -g64 / -g128), not {s.name}; or use q4 with int4-g32 (-sym)"
            )
        s.group_size(qw.shape[1])  # the scheme's own check: the group divides in_features
        codes = (qw.codes.to(torch.int16) - 128).to(torch.int8).contiguous()
        return cls(codes, qw.scale.to(torch.float16).reshape(qw.shape[0], -1).contiguous())

    @classmethod
    def from_dense(cls, w: torch.Tensor, scheme: QuantScheme | str = "int8") -> Q8DenseFormat:
        return cls.from_quantized(quantize_rtn(w, scheme))

    @property
    def scheme(self) -> QuantScheme:
        return _q8_scheme(self.codes.shape[1], self.scale.shape[1])

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def to_dense(self) -> torch.Tensor:
        return _q8_dense(self.codes, self.scale)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return q8_mm(self.codes, self.scale, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return ref_q8_mm(self.codes, self.scale, x.float())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scale))


QFORMATS = {"q4": Q4DenseFormat, "q8": Q8DenseFormat}


def make_qformat(qw: QuantizedWeight) -> Q4DenseFormat | Q8DenseFormat:
    """The dense quantized format for ``qw``'s scheme: q4 for int4, q8 for int8."""
    return (Q4DenseFormat if qw.scheme.bits == 4 else Q8DenseFormat).from_quantized(qw)
