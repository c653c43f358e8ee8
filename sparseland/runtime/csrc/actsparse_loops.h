// Inner loops of the activation-sparse bitmask kernels, shared by the actsparse_bitmask op
// (actsparse_bitmask.cpp: B batch rows, all output columns, threads split the active rows) and the fused
// decode step's single-vector kernel (actsparse_mv.cpp: B = 1, threads split the output columns).
//
// Layout (formats.py::ActSparseBitmaskFormat): mask (in, out8) uint8 over WT = W^T, values packed row
// after row (row i starts at row_ptr[i]). accumulate adds, for the active rows act[a0, a1) with inputs
// xa[a * B + b], the mask bytes [k0, k1) of each row into acc[b * stride + 8 (k - k0) + j]; a row starts at
// its byte k0 (a popcount of the bytes before gives its value offset). R rows per pass over acc.
#pragma once
#include <cstring>

#include "common.h"

namespace sparseland {
namespace actsparse_loops {

inline int64_t popcount_prefix(const uint8_t* m, int64_t nbytes) {
  int64_t n = 0, i = 0;
  for (; i + 8 <= nbytes; i += 8) {
    uint64_t w;
    std::memcpy(&w, m + i, 8);
    n += _mm_popcnt_u64(w);
  }
  for (; i < nbytes; ++i) n += _mm_popcnt_u32(m[i]);
  return n;
}

// AVX2: per mask byte, load 8 packed values and "expand" them into their output lanes (one permute + blend).
template <typename T>
inline __m256 expand8(const ExpandLUT& lut, unsigned byte, const T* v) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[byte]));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(load8(v), idx), _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
}

template <typename T, int B, int R>
inline void accumulate(const uint8_t* mask, const int64_t* row_ptr, const T* vals, const int64_t* act, const float* xa,
                       int64_t a0, int64_t a1, int64_t out8, int64_t k0, int64_t k1, float* acc, int64_t stride) {
  const ExpandLUT& lut = expand_lut();
  int64_t a = a0;
  for (; a + R <= a1; a += R) {
    const uint8_t* m[R];
    const T* v[R];
    __m256 x[R][B];
    for (int r = 0; r < R; ++r) {
      m[r] = mask + act[a + r] * out8;
      v[r] = vals + row_ptr[act[a + r]] + (k0 ? popcount_prefix(m[r], k0) : 0);
      for (int b = 0; b < B; ++b) x[r][b] = _mm256_set1_ps(xa[(a + r) * B + b]);
    }
    for (int64_t k = k0; k < k1; ++k) {
      __m256 w[R];
      for (int r = 0; r < R; ++r) {
        const unsigned byte = m[r][k];
        w[r] = expand8(lut, byte, v[r]);
        v[r] += _mm_popcnt_u32(byte);
      }
      for (int b = 0; b < B; ++b) {
        float* y = acc + b * stride + 8 * (k - k0);
        __m256 s = _mm256_fmadd_ps(w[0], x[0][b], _mm256_loadu_ps(y));
        if constexpr (R >= 2) {
          __m256 t = _mm256_mul_ps(w[1], x[1][b]);
          for (int r = 2; r + 1 < R; r += 2) {
            s = _mm256_fmadd_ps(w[r], x[r][b], s);
            t = _mm256_fmadd_ps(w[r + 1], x[r + 1][b], t);
          }
          if constexpr (R % 2) s = _mm256_fmadd_ps(w[R - 1], x[R - 1][b], s);
          s = _mm256_add_ps(s, t);
        }
        _mm256_storeu_ps(y, s);
      }
    }
  }
  if constexpr (R > 1)
    if (a < a1) accumulate<T, B, 1>(mask, row_ptr, vals, act, xa, a, a1, out8, k0, k1, acc, stride);
}

// The same on AVX-512 (F+VL+BW+DQ): 2 mask bytes (16 outputs) per step, "expanded" in one instruction:
// vexpandps from memory (fp32), or a masked load + widen + vexpandps (bf16); both read only the popcount
// values, so they never run past the packed values. k0 even; an odd k1 (== out8) ends with one byte.
#define SL_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,popcnt,bmi2")))
SL_AVX512 inline __m512 expand16(const float* p, __mmask16 k) { return _mm512_maskz_expandloadu_ps(k, p); }
SL_AVX512 inline __m512 expand16(const at::BFloat16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, _mm_popcnt_u32(k))), p);
  return _mm512_maskz_expand_ps(k, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}

template <typename T, int B, int R>
SL_AVX512 inline void accumulate512(const uint8_t* mask, const int64_t* row_ptr, const T* vals, const int64_t* act,
                                    const float* xa, int64_t a0, int64_t a1, int64_t out8, int64_t k0, int64_t k1,
                                    float* acc, int64_t stride) {
  const int64_t k2 = k0 + ((k1 - k0) & ~int64_t(1));
  int64_t a = a0;
  for (; a + R <= a1; a += R) {
    const uint8_t* m[R];
    const T* v[R];
    __m512 x[R][B];
    for (int r = 0; r < R; ++r) {
      m[r] = mask + act[a + r] * out8;
      v[r] = vals + row_ptr[act[a + r]] + (k0 ? popcount_prefix(m[r], k0) : 0);
      for (int b = 0; b < B; ++b) x[r][b] = _mm512_set1_ps(xa[(a + r) * B + b]);
    }
    for (int64_t k = k0; k < k2; k += 2) {
      __m512 w[R];
      for (int r = 0; r < R; ++r) {
        uint16_t bits;
        std::memcpy(&bits, m[r] + k, 2);
        w[r] = expand16(v[r], bits);
        v[r] += _mm_popcnt_u32(bits);
      }
      for (int b = 0; b < B; ++b) {
        float* y = acc + b * stride + 8 * (k - k0);
        __m512 s = _mm512_fmadd_ps(w[0], x[0][b], _mm512_loadu_ps(y));
        for (int r = 1; r < R; ++r) s = _mm512_fmadd_ps(w[r], x[r][b], s);
        _mm512_storeu_ps(y, s);
      }
    }
    if (k2 < k1) {  // a last odd mask byte: 8 outputs
      for (int r = 0; r < R; ++r) {
        const __m256 w = _mm512_castps512_ps256(expand16(v[r], m[r][k2]));
        for (int b = 0; b < B; ++b) {
          float* y = acc + b * stride + 8 * (k2 - k0);
          _mm256_storeu_ps(y, _mm256_fmadd_ps(w, _mm512_castps512_ps256(x[r][b]), _mm256_loadu_ps(y)));
        }
      }
    }
  }
  if constexpr (R > 1)
    if (a < a1) accumulate512<T, B, 1>(mask, row_ptr, vals, act, xa, a, a1, out8, k0, k1, acc, stride);
}

// Whether the CPU runs the AVX-512 loops (both kernels test the same features, so they take the same path).
inline bool has_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
  }();
  return ok;
}

}  // namespace actsparse_loops
}  // namespace sparseland
