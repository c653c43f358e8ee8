// Activation-sparse matmul: Y (B, out) = X (B, in) @ WT, WT (in, out) row-major (W transposed), so
// each zero input x[i] skips one contiguous row WT[i, :]. Threads split the output columns; each
// thread walks the active rows sixteen at a time, accumulating its column slice of y in L1.
#include "common.h"

namespace sparseland {

// y[c0, c1) += sum_g x_g * WT[row_g, c0:c1) over G active rows at once: one load + store of y per 8
// columns serves G rows, and G row streams are in flight (the rows of active inputs are not adjacent,
// so each row start is a jump the hardware prefetcher must pick up again; more rows in flight hide
// that). Two accumulators per 8 columns break the FMA chain.
template <typename T, int G>
static inline void act_group(const T* WT, const int64_t* act, const float* xa, float* y, int64_t out, int64_t c0,
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
static void act_cols(const T* WT, const int64_t* act, const float* xa, int64_t na, float* y, int64_t out,
                     int64_t c0, int64_t c1) {
  const int64_t c8 = c0 + ((c1 - c0) & ~int64_t(7));
  for (int64_t c = c0; c < c1; ++c) y[c] = 0.0f;
  int64_t a = 0;
  for (; a + 16 <= na; a += 16) act_group<T, 16>(WT, act + a, xa + a, y, out, c0, c8, c1);
  for (; a + 4 <= na; a += 4) act_group<T, 4>(WT, act + a, xa + a, y, out, c0, c8, c1);
  for (; a < na; ++a) act_group<T, 1>(WT, act + a, xa + a, y, out, c0, c8, c1);
}

at::Tensor actsparse_mm(at::Tensor wt, at::Tensor x) {
  TORCH_CHECK(wt.dim() == 2 && wt.is_contiguous(), "wt must be a contiguous (in, out) tensor");
  const int64_t in = wt.size(0), out = wt.size(1), B = x.size(0);
  check_x(x, in);
  auto y = at::empty({B, out}, x.options());
  const float* X = x.data_ptr<float>();
  std::vector<int64_t> act(in);
  std::vector<float> xa(in);
  const int64_t blocks = (out + 7) / 8;
  for (int64_t b = 0; b < B; ++b) {
    int64_t na = 0;
    for (int64_t i = 0; i < in; ++i)
      if (X[b * in + i] != 0.0f) act[na] = i, xa[na++] = X[b * in + i];
    float* yb = y.data_ptr<float>() + b * out;
    auto run = [&](auto* W) {
      parallel_rows(blocks, 8, [&](int64_t k0, int64_t k1) {
        act_cols(W, act.data(), xa.data(), na, yb, out, k0 * 8, std::min(out, k1 * 8));
      });
    };
    if (wt.scalar_type() == at::kFloat) run(wt.data_ptr<float>());
    else if (wt.scalar_type() == at::kBFloat16) run(wt.data_ptr<at::BFloat16>());
    else TORCH_CHECK(false, "actsparse_mm: weight dtype must be float32 or bfloat16");
  }
  return y;
}

}  // namespace sparseland
