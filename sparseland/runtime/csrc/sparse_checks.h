// Input checks shared by the sparse-format ops (sparse.cpp matmuls, to_dense.cpp): every kernel reads
// through raw pointers, so a malformed layout must be rejected before any row is touched.
#pragma once
#include "common.h"

namespace sparseland {

inline void check_mask(const at::Tensor& mask) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous(),
              "mask must be a contiguous uint8 (out, ceil(in/8)) tensor");
}

inline void check_values(const at::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == at::kFloat || values.scalar_type() == at::kBFloat16,
              "values must be float32 or bfloat16");
  TORCH_CHECK(values.is_contiguous(), "values must be contiguous");
}

// row_ptr: contiguous int64 (out+1,), starting at >= 0, non-decreasing, and row_ptr[out] + 8 <= values.numel()
// (the kernels load 8 values at a time from any row start).
inline void check_row_ptr(const at::Tensor& row_ptr, int64_t out, int64_t nvalues) {
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kLong && row_ptr.numel() == out + 1,
              "row_ptr must be an int64 (out+1,) tensor");
  TORCH_CHECK(row_ptr.is_contiguous(), "row_ptr must be contiguous");
  const int64_t* R = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(R[0] >= 0, "row_ptr[0] must be >= 0");
  for (int64_t r = 0; r < out; ++r)
    TORCH_CHECK(R[r + 1] >= R[r], "row_ptr must be non-decreasing (row ", r, ": ", R[r], " > ", R[r + 1], ")");
  TORCH_CHECK(R[out] + 8 <= nvalues, "values must hold row_ptr[out] = ", R[out], " values plus 8 zeros of padding, got ",
              nvalues);
}

inline int64_t popcount_bytes(const uint8_t* p, int64_t n) {
  int64_t c = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    std::memcpy(&w, p + i, 8);
    c += __builtin_popcountll(w);
  }
  for (; i < n; ++i) c += __builtin_popcount(p[i]);
  return c;
}

// Each row's set bits equal its row_ptr span.
inline void check_row_counts(const at::Tensor& mask, const at::Tensor& row_ptr) {
  const int64_t out = mask.size(0), in8 = mask.size(1);
  const uint8_t* M = mask.data_ptr<uint8_t>();
  const int64_t* R = row_ptr.data_ptr<int64_t>();
  for (int64_t r = 0; r < out; ++r) {
    const int64_t c = popcount_bytes(M + r * in8, in8);
    TORCH_CHECK(c == R[r + 1] - R[r], "row ", r, " of the mask has ", c, " set bits but row_ptr gives it ",
                R[r + 1] - R[r], " values");
  }
}

// in_features fits the mask width: in8 = ceil(in / 8).
inline void check_in_features(int64_t in8, int64_t in_features) {
  TORCH_CHECK(in_features >= 0 && (in_features + 7) / 8 == in8, "in_features ", in_features,
              " does not match a mask of ", in8, " bytes per row");
}

}  // namespace sparseland
