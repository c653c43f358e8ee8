// Dense fp32 weights rebuilt from the sparse formats, for prefill (many rows: torch's GEMM on the rebuilt
// weight beats the matvec kernels there). Parallel over rows; per mask byte one table permute + blend puts
// the byte's packed values in their lanes (as in the AVX2 bitmask kernel) and one store writes 8 columns.
// bf16 values are widened exactly (bf16 is the top half of an fp32). Registered as a fragment of the
// `sparseland` op library, with the ISA switch of the bitmask kernels (sparse.cpp).
#include <cstring>

#include <torch/library.h>

#include "common.h"
#include "sparse_checks.h"

namespace sparseland {

int64_t set_bitmask_isa(int64_t level);
int64_t cpu_bitmask_isa();

// One row: in8 mask bytes m, values from v (advanced by `per_byte` or by each byte's popcount),
// writing in_features floats to o.
template <typename T, bool NM>
static void expand_row(const uint8_t* m, const T* v, float* o, int64_t in8, int64_t in_features) {
  const ExpandLUT& lut = expand_lut();
  const __m256 zero = _mm256_setzero_ps();
  const int64_t full = in_features / 8;  // bytes whose 8 columns all lie inside the row
  for (int64_t k = 0; k < in8; ++k) {
    const unsigned byte = m[k];
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[byte]));
    const __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(load8(v), idx), zero, _mm256_castsi256_ps(idx));
    if (k < full) {
      _mm256_storeu_ps(o + 8 * k, w);
    } else {  // the last, partial byte: columns 8k .. in_features-1
      const int n = static_cast<int>(in_features - 8 * k);
      const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      _mm256_maskstore_ps(o + 8 * k, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lanes), w);
    }
    v += NM ? 4 : _mm_popcnt_u32(byte);
  }
}

at::Tensor bitmask_to_dense(at::Tensor mask, at::Tensor row_ptr, at::Tensor values, int64_t in_features) {
  check_mask(mask);
  check_values(values);
  const int64_t out = mask.size(0), in8 = mask.size(1);
  check_in_features(in8, in_features);
  check_row_ptr(row_ptr, out, values.numel());
  check_row_counts(mask, row_ptr);
  const uint8_t* M = mask.data_ptr<uint8_t>();
  if (in_features % 8)  // bits past in_features would have values but no column
    for (int64_t r = 0; r < out; ++r)
      TORCH_CHECK((M[r * in8 + in8 - 1] >> (in_features % 8)) == 0, "row ", r, " of the mask has bits set past in_features ",
                  in_features);
  auto w = at::empty({out, in_features}, values.options().dtype(at::kFloat));
  const int64_t* R = row_ptr.data_ptr<int64_t>();
  float* W = w.data_ptr<float>();
  auto run = [&](auto* V) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(V)>>;
    parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) expand_row<T, false>(M + r * in8, V + R[r], W + r * in_features, in8, in_features);
    });
  };
  if (values.scalar_type() == at::kFloat) run(values.data_ptr<float>());
  else run(values.data_ptr<at::BFloat16>());
  return w;
}

at::Tensor nm4_to_dense(at::Tensor mask, at::Tensor values, int64_t in_features) {
  check_mask(mask);
  check_values(values);
  const int64_t out = mask.size(0), in8 = mask.size(1);
  check_in_features(in8, in_features);
  TORCH_CHECK(values.numel() >= out * in8 * 4 + 8, "values must hold 4 per mask byte plus 8 zeros of padding: ",
              out * in8 * 4 + 8, ", got ", values.numel());
  const uint8_t* M = mask.data_ptr<uint8_t>();
  for (int64_t i = 0; i < out * in8; ++i)  // (columns past in_features may be kept: zeros of the padding groups)
    TORCH_CHECK(__builtin_popcount(M[i]) == 4, "every N:M mask byte must have 4 bits set; byte ", i % in8, " of row ",
                i / in8, " has ", __builtin_popcount(M[i]));
  auto w = at::empty({out, in_features}, values.options().dtype(at::kFloat));
  float* W = w.data_ptr<float>();
  auto run = [&](auto* V) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(V)>>;
    parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        expand_row<T, true>(M + r * in8, V + r * in8 * 4, W + r * in_features, in8, in_features);
    });
  };
  if (values.scalar_type() == at::kFloat) run(values.data_ptr<float>());
  else run(values.data_ptr<at::BFloat16>());
  return w;
}

}  // namespace sparseland

TORCH_LIBRARY_FRAGMENT(sparseland, m) {
  m.def("bitmask_to_dense(Tensor mask, Tensor row_ptr, Tensor values, int in_features) -> Tensor",
        &sparseland::bitmask_to_dense);
  m.def("nm4_to_dense(Tensor mask, Tensor values, int in_features) -> Tensor", &sparseland::nm4_to_dense);
  m.def("set_bitmask_isa(int level) -> int", &sparseland::set_bitmask_isa);
  m.def("cpu_bitmask_isa() -> int", &sparseland::cpu_bitmask_isa);
}
