// Internal single-vector kernels (no allocation, no threading): y[r] = W[r, :] . x for rows [r0, r1).
// x holds ceil(in/8)*8 floats (zero padded past `in`) for the bitmask / N:M kernels. The ops in
// dense.cpp / sparse.cpp and the fused decode step (decode_step.cpp) share these.
#pragma once
#include <ATen/ATen.h>
#include <cstdint>

namespace sparseland {

void dense_mv(const float* W, const float* x, float* y, int64_t in, int64_t r0, int64_t r1);
void dense_mv(const at::BFloat16* W, const float* x, float* y, int64_t in, int64_t r0, int64_t r1);
void bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const float* vals, const float* x, float* y, int64_t in8,
                int64_t r0, int64_t r1);
void bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const at::BFloat16* vals, const float* x, float* y,
                int64_t in8, int64_t r0, int64_t r1);
void nm4_mv(const uint8_t* mask, const float* vals, const float* x, float* y, int64_t in8, int64_t r0, int64_t r1);
void nm4_mv(const uint8_t* mask, const at::BFloat16* vals, const float* x, float* y, int64_t in8, int64_t r0,
            int64_t r1);

}  // namespace sparseland
