// Internal single-vector activation-sparse kernels for the fused decode step (decode_step.cpp): the
// arithmetic of actsparse.cpp / actsparse_bitmask.cpp for one input vector (batch 1), restricted to a
// range of OUTPUT columns, so the step splits them across threads like its other matvecs. Per output
// column the sums are formed in the same order as those ops with one thread, whatever the range.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

namespace sparseland {

// The active inputs of x (in,): i with v = (|x[i]| > thr[i] ? x[i] : x[i] * 0) != 0 (thr == nullptr:
// v = x[i]), i.e. the inputs an activation-site hook (x * keep) leaves for the actsparse kernels. Writes
// act[0, na) and xa[0, na) = v; returns na.
int64_t act_gather(const float* x, const float* thr, int64_t in, int64_t* act, float* xa);

// ActSparseFormat: WT (in, out) row-major. y[c] = sum_a xa[a] * WT[act[a], c] for c in [c0, c1);
// c0 must be a multiple of 8 and c1 one too or == out.
void actsparse_mv(const float* WT, const int64_t* act, const float* xa, int64_t na, float* y, int64_t out, int64_t c0,
                  int64_t c1);
void actsparse_mv(const at::BFloat16* WT, const int64_t* act, const float* xa, int64_t na, float* y, int64_t out,
                  int64_t c0, int64_t c1);

// ActSparseBitmaskFormat: mask (in, out8) uint8, row_ptr (in + 1,), vals (nnz + 8,). y[c] for c in
// [c0, c1); c0 must be a multiple of 16 and c1 one too or == out. acc: scratch of >= c1 - c0 + 16 floats.
void actsparse_bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const float* vals, const int64_t* act,
                          const float* xa, int64_t na, float* y, int64_t out, int64_t c0, int64_t c1, float* acc);
void actsparse_bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const at::BFloat16* vals, const int64_t* act,
                          const float* xa, int64_t na, float* y, int64_t out, int64_t c0, int64_t c1, float* acc);

}  // namespace sparseland
