// Single-vector activation-sparse kernels over a range of output columns, for the fused decode step
// (see actsparse_mv.h); the actsparse op (actsparse.cpp) runs these same loops. The bitmask loops are
// those of actsparse_bitmask.cpp (accumulate / accumulate512 with B = 1, R = 4), so a column gets the same sum
// as the op computes for it with one thread; the differences are that a thread here owns a column
// range (the bitmask op splits active rows instead) and starts each active row at its first byte of
// the range (a popcount of the mask bytes before it gives the value offset).
#include "actsparse_mv.h"

#include <cstring>

#include "common.h"

namespace sparseland {

int64_t act_gather(const float* x, const float* thr, int64_t in, int64_t* act, float* xa) {
  int64_t na = 0;
  if (thr == nullptr) {
    for (int64_t i = 0; i < in; ++i)
      if (x[i] != 0.0f) act[na] = i, xa[na++] = x[i];
    return na;
  }
  for (int64_t i = 0; i < in; ++i) {
    const float v = std::fabs(x[i]) > thr[i] ? x[i] : x[i] * 0.0f;  // x * keep, as the hook computes it
    if (v != 0.0f) act[na] = i, xa[na++] = v;
  }
  return na;
}

namespace {

// ----- ActSparseFormat (dense W^T): actsparse.cpp's loops -----

template <typename T, int G>
inline void act_group(const T* WT, const int64_t* act, const float* xa, float* y, int64_t out, int64_t c0,
                      int64_t c8, int64_t c1) {
  const T* r[G];
  __m256 xv[G];
  for (int g = 0; g < G; ++g) {
    r[g] = WT + act[g] * out;
    xv[g] = _mm256_set1_ps(xa[g]);
  }
  for (int64_t c = c0; c < c8; c += 8) {
    __m256 s = _mm256_fmadd_ps(load8(r[0] + c), xv[0], _mm256_loadu_ps(y + c));
    if (G == 1) {
      _mm256_storeu_ps(y + c, s);
      continue;
    }
    __m256 t = _mm256_mul_ps(load8(r[1] + c), xv[1]);
    for (int g = 2; g + 1 < G; g += 2) {
      s = _mm256_fmadd_ps(load8(r[g] + c), xv[g], s);
      t = _mm256_fmadd_ps(load8(r[g + 1] + c), xv[g + 1], t);
    }
    _mm256_storeu_ps(y + c, _mm256_add_ps(s, t));
  }
  for (int64_t c = c8; c < c1; ++c) {
    float s = y[c];
    for (int g = 0; g < G; ++g) s += to_f32(r[g][c]) * xa[g];
    y[c] = s;
  }
}

template <typename T>
void act_cols(const T* WT, const int64_t* act, const float* xa, int64_t na, float* y, int64_t out, int64_t c0,
              int64_t c1) {
  const int64_t c8 = c0 + ((c1 - c0) & ~int64_t(7));
  for (int64_t c = c0; c < c1; ++c) y[c] = 0.0f;
  int64_t a = 0;
  for (; a + 16 <= na; a += 16) act_group<T, 16>(WT, act + a, xa + a, y, out, c0, c8, c1);
  for (; a + 4 <= na; a += 4) act_group<T, 4>(WT, act + a, xa + a, y, out, c0, c8, c1);
  for (; a < na; ++a) act_group<T, 1>(WT, act + a, xa + a, y, out, c0, c8, c1);
}

// ----- ActSparseBitmaskFormat: actsparse_bitmask.cpp's loops over mask bytes [k0, k1) -----

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

template <typename T>
inline __m256 expand8(const ExpandLUT& lut, unsigned byte, const T* v) {
  const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[byte]));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(load8(v), idx), _mm256_setzero_ps(), _mm256_castsi256_ps(idx));
}

// acc[8 (k - k0) + j] += xa[a] * WT[act[a], 8k + j] for a in [a0, a1), k in [k0, k1), R rows per pass.
template <typename T, int R>
void accumulate(const uint8_t* mask, const int64_t* row_ptr, const T* vals, const int64_t* act, const float* xa,
                int64_t a0, int64_t a1, int64_t out8, int64_t k0, int64_t k1, float* acc) {
  const ExpandLUT& lut = expand_lut();
  int64_t a = a0;
  for (; a + R <= a1; a += R) {
    const uint8_t* m[R];
    const T* v[R];
    __m256 x[R];
    for (int r = 0; r < R; ++r) {
      m[r] = mask + act[a + r] * out8;
      v[r] = vals + row_ptr[act[a + r]] + (k0 ? popcount_prefix(m[r], k0) : 0);
      x[r] = _mm256_set1_ps(xa[a + r]);
    }
    for (int64_t k = k0; k < k1; ++k) {
      __m256 w[R];
      for (int r = 0; r < R; ++r) {
        const unsigned byte = m[r][k];
        w[r] = expand8(lut, byte, v[r]);
        v[r] += _mm_popcnt_u32(byte);
      }
      float* y = acc + 8 * (k - k0);
      __m256 s = _mm256_fmadd_ps(w[0], x[0], _mm256_loadu_ps(y));
      if constexpr (R >= 2) {
        __m256 t = _mm256_mul_ps(w[1], x[1]);
        for (int r = 2; r + 1 < R; r += 2) {
          s = _mm256_fmadd_ps(w[r], x[r], s);
          t = _mm256_fmadd_ps(w[r + 1], x[r + 1], t);
        }
        if constexpr (R % 2) s = _mm256_fmadd_ps(w[R - 1], x[R - 1], s);
        s = _mm256_add_ps(s, t);
      }
      _mm256_storeu_ps(y, s);
    }
  }
  if constexpr (R > 1)
    if (a < a1) accumulate<T, 1>(mask, row_ptr, vals, act, xa, a, a1, out8, k0, k1, acc);
}

#define SL_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,popcnt,bmi2")))
SL_AVX512 inline __m512 expand16(const float* p, __mmask16 k) { return _mm512_maskz_expandloadu_ps(k, p); }
SL_AVX512 inline __m512 expand16(const at::BFloat16* p, __mmask16 k) {
  const __m256i h = _mm256_maskz_loadu_epi16(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, _mm_popcnt_u32(k))), p);
  return _mm512_maskz_expand_ps(k, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
}

// The same on AVX-512: 2 mask bytes (16 outputs) per step; k0 even; an odd k1 (== out8) ends with one byte.
template <typename T, int R>
SL_AVX512 void accumulate512(const uint8_t* mask, const int64_t* row_ptr, const T* vals, const int64_t* act,
                             const float* xa, int64_t a0, int64_t a1, int64_t out8, int64_t k0, int64_t k1,
                             float* acc) {
  const int64_t k2 = k0 + ((k1 - k0) & ~int64_t(1));
  int64_t a = a0;
  for (; a + R <= a1; a += R) {
    const uint8_t* m[R];
    const T* v[R];
    __m512 x[R];
    for (int r = 0; r < R; ++r) {
      m[r] = mask + act[a + r] * out8;
      v[r] = vals + row_ptr[act[a + r]] + (k0 ? popcount_prefix(m[r], k0) : 0);
      x[r] = _mm512_set1_ps(xa[a + r]);
    }
    for (int64_t k = k0; k < k2; k += 2) {
      __m512 w[R];
      for (int r = 0; r < R; ++r) {
        uint16_t bits;
        std::memcpy(&bits, m[r] + k, 2);
        w[r] = expand16(v[r], bits);
        v[r] += _mm_popcnt_u32(bits);
      }
      float* y = acc + 8 * (k - k0);
      __m512 s = _mm512_fmadd_ps(w[0], x[0], _mm512_loadu_ps(y));
      for (int r = 1; r < R; ++r) s = _mm512_fmadd_ps(w[r], x[r], s);
      _mm512_storeu_ps(y, s);
    }
    if (k2 < k1) {  // a last odd mask byte: 8 outputs
      float* y = acc + 8 * (k2 - k0);
      for (int r = 0; r < R; ++r) {
        const __m256 w = _mm512_castps512_ps256(expand16(v[r], m[r][k2]));
        _mm256_storeu_ps(y, _mm256_fmadd_ps(w, _mm512_castps512_ps256(x[r]), _mm256_loadu_ps(y)));
      }
    }
  }
  if constexpr (R > 1)
    if (a < a1) accumulate512<T, 1>(mask, row_ptr, vals, act, xa, a, a1, out8, k0, k1, acc);
}

bool has_avx512() {  // the actsparse_bitmask op's test, so both take the same path
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2");
  }();
  return ok;
}

template <typename T>
void bitmask_cols(const uint8_t* mask, const int64_t* row_ptr, const T* vals, const int64_t* act, const float* xa,
                  int64_t na, float* y, int64_t out, int64_t c0, int64_t c1, float* acc) {
  if (c0 >= c1) return;
  const int64_t out8 = (out + 7) / 8, k0 = c0 / 8, k1 = (c1 + 7) / 8;
  std::fill(acc, acc + 8 * (k1 - k0), 0.0f);
  if (has_avx512()) accumulate512<T, 4>(mask, row_ptr, vals, act, xa, 0, na, out8, k0, k1, acc);
  else accumulate<T, 4>(mask, row_ptr, vals, act, xa, 0, na, out8, k0, k1, acc);
  std::copy(acc, acc + (c1 - c0), y + c0);
}

}  // namespace

void actsparse_mv(const float* WT, const int64_t* act, const float* xa, int64_t na, float* y, int64_t out, int64_t c0,
                  int64_t c1) {
  act_cols(WT, act, xa, na, y, out, c0, c1);
}
void actsparse_mv(const at::BFloat16* WT, const int64_t* act, const float* xa, int64_t na, float* y, int64_t out,
                  int64_t c0, int64_t c1) {
  act_cols(WT, act, xa, na, y, out, c0, c1);
}
void actsparse_bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const float* vals, const int64_t* act,
                          const float* xa, int64_t na, float* y, int64_t out, int64_t c0, int64_t c1, float* acc) {
  bitmask_cols(mask, row_ptr, vals, act, xa, na, y, out, c0, c1, acc);
}
void actsparse_bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const at::BFloat16* vals, const int64_t* act,
                          const float* xa, int64_t na, float* y, int64_t out, int64_t c0, int64_t c1, float* acc) {
  bitmask_cols(mask, row_ptr, vals, act, xa, na, y, out, c0, c1, acc);
}

}  // namespace sparseland
