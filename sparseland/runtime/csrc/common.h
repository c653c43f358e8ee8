// Shared helpers for sparseland's CPU kernels: AVX2/FMA loads of fp32 and bf16, threading, checks.
#pragma once
#include <immintrin.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cstdint>
#include <vector>

namespace sparseland {

// 8 values -> 8 fp32 lanes. bf16 is the top half of an fp32, so widen and shift left by 16.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float to_f32(float v) { return v; }
inline float to_f32(at::BFloat16 v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Run fn(begin, end) over [0, n) on torch's intra-op threads (torch.set_num_threads), one even
// chunk per thread; with one thread (or tiny n) call fn directly: no pool wake-up, which costs
// milliseconds when another job shares the cores.
template <typename F>
inline void parallel_rows(int64_t n, int64_t grain, const F& fn) {
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || n <= grain) {
    fn(0, n);
    return;
  }
  at::parallel_for(0, n, std::max(grain, (n + nt - 1) / nt), fn);
}

// Copy X (B, in) fp32 into a zero-padded (B, in_pad) buffer so kernels can read whole 8-lane chunks.
inline std::vector<float> padded_input(const at::Tensor& x, int64_t in_pad) {
  const int64_t B = x.size(0), in = x.size(1);
  std::vector<float> buf(B * in_pad + 16, 0.0f);
  const float* src = x.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b) std::copy(src + b * in, src + (b + 1) * in, buf.begin() + b * in_pad);
  return buf;
}

inline void check_x(const at::Tensor& x, int64_t in) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              "x must be a contiguous float32 (B, in) tensor");
  TORCH_CHECK(x.size(1) == in, "x has ", x.size(1), " features, weight expects ", in);
}

// 256-entry table for "expand": lane j of byte k takes packed value rank(j); lanes whose bit is off
// have the sign bit set, so one load serves both vpermps (uses the low 3 bits) and vblendvps (sign).
struct ExpandLUT {
  alignas(32) int32_t idx[256][8];
  ExpandLUT() {
    for (int k = 0; k < 256; ++k) {
      int r = 0;
      for (int j = 0; j < 8; ++j) {
        bool on = (k >> j) & 1;
        idx[k][j] = on ? r : static_cast<int32_t>(0x80000000u);
        r += on;
      }
    }
  }
};
// "compress": lanes 0..popcount-1 take the positions of the set bits, in order.
struct CompressLUT {
  alignas(32) int32_t idx[256][8];
  CompressLUT() {
    for (int k = 0; k < 256; ++k) {
      int r = 0;
      for (int j = 0; j < 8; ++j) idx[k][j] = 0;
      for (int j = 0; j < 8; ++j)
        if ((k >> j) & 1) idx[k][r++] = j;
    }
  }
};
const ExpandLUT& expand_lut();
const CompressLUT& compress_lut();

}  // namespace sparseland
