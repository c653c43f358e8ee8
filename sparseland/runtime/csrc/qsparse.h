// Sparse + 4-bit weights: single-vector kernels for the fused decode step (qsparse.cpp).
//
// Weight W (out, in) with 4-bit codes q in [0, 16), fp16 scale d and offset m per row and per group
// of `group` columns (group in {32, 64, 128}, in % group == 0, in % 32 == 0):
//     W[r, c] = d[r, c / group] * q[r, c] + m[r, c / group]   for kept (r, c), 0 where pruned.
// Symmetric schemes pass offset == nullptr: m = -8 d.
//
// Mask: (out, in / 8) uint8, row after row; bit j (LSB first) of byte k is column 8k + j (kept).
//
// Code layout ("chunked nibbles", both formats): the kept codes of a row, in column order, are split
// into chunks of 64 codes (the last chunk may be shorter, n codes); a chunk of n codes takes
// h = ceil(n / 2) bytes and byte i holds code i in its low nibble and code i + h in its high nibble
// (0 if i + h >= n). A full chunk is 32 bytes: low nibbles = codes 0..31, high = 32..63, so one AND
// and one shift unpack it into 64 bytes in order. A row of n codes takes ceil(n / 2) bytes.
//   - N:M (q4nm, 2:4 / 4:8): every mask byte has exactly 4 bits set, so each row has in / 2 codes and
//     row r's codes start at byte r * in / 4 (codes (out, in / 4) uint8, no offsets).
//   - bitmask (q4bitmask): row r's codes are bytes [row_ptr[r], row_ptr[r + 1]) of `codes`, and must
//     number exactly ceil(popcount(mask row r) / 2).
//
// Math: x is quantized per block of 32 columns to int8 (Q8_0 style, computed by the kernel):
//     s_b = amax_b / 127,  xq[c] = round_half_even(x[c] * (127 / amax_b))   (0 if amax_b == 0),
// and y[r] = sum_b s_b * (d_G * sum_{c in b} q[r,c] xq[c] + m_G * sum_{c in b, kept} xq[c]),
// integer dot products inside a block (vpdpbusd on AVX-512 VNNI, vpmaddubsw/vpmaddwd on AVX2), fp32
// across blocks. The error against the float product is |sum_c W[r,c] (x[c] - s_b xq[c])| <=
// sum_c |W[r,c]| s_b / 2.
//
// Contract of the single-vector entry points (q4nm_mv, q4bitmask_mv):
//   - compute y[r] for r in [r0, r1) only; y is indexed by absolute row (y[r], not y[r - r0]);
//   - x: float32, `in` entries are read (callers may pass the usual ceil(in/8)*8 + 8 zero-padded
//     buffer; nothing past `in` is read);
//   - pointers are the whole weight's (mask, codes, scale, offset, row_ptr), not the row range's;
//   - thread-safe: may run concurrently from several threads on disjoint row ranges; no allocation
//     once a thread's scratch (thread_local, grown to the largest `in` seen) exists;
//   - nothing is validated except (q4bitmask_mv) each row's byte count against its mask: a row whose
//     count disagrees is not read and its y is NaN, and the call returns false. Validate shapes once
//     when the weight is loaded (the torch ops q4nm_mm / q4bitmask_mm show the checks).
//   - ISA: AVX-512 (F, BW, VL, VNNI, VBMI2) when the CPU has it, else AVX2 + FMA + F16C; the env var
//     SPARSELAND_QUANT_ISA=avx2 (read once) or torch.ops.sparseland.qsparse_set_isa("avx2") forces
//     the AVX2 path.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

namespace sparseland {

void q4nm_mv(const uint8_t* mask, const uint8_t* codes, const at::Half* scale, const at::Half* offset, const float* x,
             float* y, int64_t in, int64_t group, int64_t r0, int64_t r1);

bool q4bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const uint8_t* codes, const at::Half* scale,
                  const at::Half* offset, const float* x, float* y, int64_t in, int64_t group, int64_t r0, int64_t r1);

}  // namespace sparseland
