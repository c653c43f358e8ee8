// Activation-sparse matmul: Y (B, out) = X (B, in) @ WT, WT (in, out) row-major (W transposed), so
// each zero input x[i] skips one contiguous row WT[i, :]. Threads split the output columns; each
// thread walks the active rows four at a time, accumulating its column slice of y in L1.
#include "common.h"

namespace sparseland {

template <typename T>
static void act_cols(const T* WT, const int64_t* act, const float* xa, int64_t na, float* y, int64_t out,
                     int64_t c0, int64_t c1) {
  const int64_t c8 = c0 + ((c1 - c0) & ~int64_t(7));
  for (int64_t c = c0; c < c1; ++c) y[c] = 0.0f;
  int64_t a = 0;
  for (; a + 4 <= na; a += 4) {
    const T *r0 = WT + act[a] * out, *r1 = WT + act[a + 1] * out, *r2 = WT + act[a + 2] * out,
            *r3 = WT + act[a + 3] * out;
    const __m256 x0 = _mm256_set1_ps(xa[a]), x1 = _mm256_set1_ps(xa[a + 1]), x2 = _mm256_set1_ps(xa[a + 2]),
                 x3 = _mm256_set1_ps(xa[a + 3]);
    for (int64_t c = c0; c < c8; c += 8) {
      __m256 s = _mm256_fmadd_ps(load8(r0 + c), x0, _mm256_loadu_ps(y + c));
      __m256 t = _mm256_mul_ps(load8(r1 + c), x1);
      s = _mm256_fmadd_ps(load8(r2 + c), x2, s);
      t = _mm256_fmadd_ps(load8(r3 + c), x3, t);
      _mm256_storeu_ps(y + c, _mm256_add_ps(s, t));
    }
    for (int64_t c = c8; c < c1; ++c)
      y[c] += to_f32(r0[c]) * xa[a] + to_f32(r1[c]) * xa[a + 1] + to_f32(r2[c]) * xa[a + 2] + to_f32(r3[c]) * xa[a + 3];
  }
  for (; a < na; ++a) {
    const T* r0 = WT + act[a] * out;
    const __m256 x0 = _mm256_set1_ps(xa[a]);
    for (int64_t c = c0; c < c8; c += 8) _mm256_storeu_ps(y + c, _mm256_fmadd_ps(load8(r0 + c), x0, _mm256_loadu_ps(y + c)));
    for (int64_t c = c8; c < c1; ++c) y[c] += to_f32(r0[c]) * xa[a];
  }
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
