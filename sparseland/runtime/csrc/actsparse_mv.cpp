// Single-vector activation-sparse kernels over a range of output columns, for the fused decode step
// (see actsparse_mv.h); the actsparse op (actsparse.cpp) runs these same loops. The bitmask loops are
// actsparse_loops.h's, which the actsparse_bitmask op runs too (here B = 1, R = 4), so a column gets the same sum
// as the op computes for it with one thread; the differences are that a thread here owns a column
// range (the bitmask op splits active rows instead) and starts each active row at its first byte of
// the range (a popcount of the mask bytes before it gives the value offset).
#include "actsparse_mv.h"

#include "actsparse_loops.h"
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

// ----- ActSparseBitmaskFormat: the loops of actsparse_loops.h over the mask bytes of [c0, c1) -----

template <typename T>
void bitmask_cols(const uint8_t* mask, const int64_t* row_ptr, const T* vals, const int64_t* act, const float* xa,
                  int64_t na, float* y, int64_t out, int64_t c0, int64_t c1, float* acc) {
  if (c0 >= c1) return;
  const int64_t out8 = (out + 7) / 8, k0 = c0 / 8, k1 = (c1 + 7) / 8;
  std::fill(acc, acc + 8 * (k1 - k0), 0.0f);
  if (actsparse_loops::has_avx512())
    actsparse_loops::accumulate512<T, 1, 4>(mask, row_ptr, vals, act, xa, 0, na, out8, k0, k1, acc, 0);
  else
    actsparse_loops::accumulate<T, 1, 4>(mask, row_ptr, vals, act, xa, 0, na, out8, k0, k1, acc, 0);
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
