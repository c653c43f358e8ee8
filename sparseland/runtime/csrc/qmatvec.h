// Dense quantized weights (sparseland/runtime/qformats.py): single-vector entry points for the fused
// decode step. Implementation and the math: qdense.cpp.
//
// Q4 layout (Q4DenseFormat), W (out, in), in % group == 0, group in {32, 64, 128}:
//   codes  (out, in/2) uint8, row-major. Row r, block k of 32 columns = bytes [16k, 16k+16) of the row;
//          byte j holds code[32k + j] in its low nibble and code[32k + j + 16] in its high nibble
//          (llama.cpp's Q4_0/Q4_1 block order).
//   scale  (out, in/group) float16 bits (at::Half), row-major.
//   offset (out, in/group) float16 or nullptr (symmetric: offset = -8 * scale).
//   W[r, c] = scale[r, c/group] * code[r, c] + offset[r, c/group].
// Q8 layout (Q8DenseFormat), symmetric, one scale per row or per row and group (q8dense.cpp):
//   codes  (out, in) int8 = code - 128; any in (per row), in % group == 0 (groups).
//   scale  (out, 1) float16: W[r, c] = scale[r] * codes[r, c]; or (out, in/group), group in {32, 64, 128}:
//          W[r, c] = scale[r, c/group] * codes[r, c] (int8-g32 is llama.cpp's Q8_0 grid).
//
// Contract of q4_mv / q8_mv:
//   y[r] = sum_c W[r, c] * x[c] for r in [r0, r1), approximately: x is quantized per block of 32 to
//   int8 (scale max|x|/127, round to nearest even, llama.cpp Q8 style) and the dot products run in
//   integers; the offset term uses the exact float sum of x per group. Relative error ~1e-2 of |y|.
//   x: `in` floats (only x[0, in) is read; padding after it is allowed and ignored).
//   y: only y[r0, r1) is written.
//   Thread safety: callable concurrently from any number of threads on disjoint row ranges (the
//   quantized x lives in a thread_local buffer that each call refills; no allocation once that
//   buffer has grown to the largest `in` seen by the thread). No threading inside.
//   The instruction set (AVX-512 VNNI if the CPU has it, else AVX2) is chosen once per process;
//   SPARSELAND_QUANT_ISA=avx2 forces the AVX2 path.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>
#include <optional>

namespace sparseland {

// codes (out, in/2), scale/offset (out, in/group); group in {32, 64, 128}, in % group == 0.
void q4_mv(const uint8_t* codes, const at::Half* scale, const at::Half* offset /*nullable*/, int64_t in, int64_t group,
           const float* x, float* y, int64_t r0, int64_t r1);
// codes (out, in) int8 (code - 128), scale (out,) float16 (group 0) or (out, in/group) (group 32, 64, 128).
void q8_mv(const int8_t* codes, const at::Half* scale, int64_t in, int64_t group, const float* x, float* y, int64_t r0,
           int64_t r1);

// The q4_mm op (qdense.cpp): x (B, in) float32 -> (B, out) for a Q4 weight, also called by qsparse.cpp.
at::Tensor q4_mm(at::Tensor codes, at::Tensor scale, std::optional<at::Tensor> offset, int64_t group, at::Tensor x);

// "avx512vnni" or "avx2": the path q4_mv / q8_mv / the q4_mm / q8_mm ops take in this process.
const char* quant_isa_name();

}  // namespace sparseland
