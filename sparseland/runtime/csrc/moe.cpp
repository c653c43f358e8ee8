// MoE MLP decode step for one token: y (1, H) = sum over active neurons j of
//   silu(Wg[j] . x) * (Wu[j] . x) * WdT[j]
// Wg, Wu, WdT: (I, H) fp32 row-major (WdT is the down projection transposed). segs (S, 2) int64 lists
// the active neurons as [start, end) runs (after MoE-fication each expert is one run), so only the
// active experts' rows are read. The active rows are split evenly across threads; each thread computes
// its rows' gate/up dot products and adds its rows of WdT into its own partial sum (no barrier between
// the two phases); the partial sums are added at the end. Reference: sparseland/runtime/moe.py.
#include <torch/library.h>
#include <cmath>
#include "common.h"
#include "matvec.h"

namespace sparseland {

// acc (H) += sum_i h[i] * rows[i] over n rows of WdT, four rows per pass over acc.
static void axpy_rows(const float* WdT, const float* h, int64_t r0, int64_t r1, int64_t H, float* acc) {
  const int64_t H8 = H & ~int64_t(7);
  int64_t r = r0;
  for (; r + 4 <= r1; r += 4) {
    const float* w0 = WdT + r * H;
    const __m256 a0 = _mm256_set1_ps(h[r]), a1 = _mm256_set1_ps(h[r + 1]);
    const __m256 a2 = _mm256_set1_ps(h[r + 2]), a3 = _mm256_set1_ps(h[r + 3]);
    for (int64_t c = 0; c < H8; c += 8) {
      __m256 s = _mm256_loadu_ps(acc + c);
      s = _mm256_fmadd_ps(a0, _mm256_loadu_ps(w0 + c), s);
      s = _mm256_fmadd_ps(a1, _mm256_loadu_ps(w0 + H + c), s);
      s = _mm256_fmadd_ps(a2, _mm256_loadu_ps(w0 + 2 * H + c), s);
      s = _mm256_fmadd_ps(a3, _mm256_loadu_ps(w0 + 3 * H + c), s);
      _mm256_storeu_ps(acc + c, s);
    }
    for (int64_t c = H8; c < H; ++c)
      acc[c] += h[r] * w0[c] + h[r + 1] * w0[H + c] + h[r + 2] * w0[2 * H + c] + h[r + 3] * w0[3 * H + c];
  }
  for (; r < r1; ++r) {
    const float* w = WdT + r * H;
    const __m256 a = _mm256_set1_ps(h[r]);
    for (int64_t c = 0; c < H8; c += 8)
      _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(a, _mm256_loadu_ps(w + c), _mm256_loadu_ps(acc + c)));
    for (int64_t c = H8; c < H; ++c) acc[c] += h[r] * w[c];
  }
}

at::Tensor moe_mlp(at::Tensor x, at::Tensor wg, at::Tensor wu, at::Tensor wdt, at::Tensor segs) {
  TORCH_CHECK(wg.dim() == 2 && wg.scalar_type() == at::kFloat && wg.is_contiguous(), "w_gate must be contiguous fp32 (I, H)");
  const int64_t I = wg.size(0), H = wg.size(1);
  for (const auto* w : {&wu, &wdt})
    TORCH_CHECK(w->dim() == 2 && w->size(0) == I && w->size(1) == H && w->scalar_type() == at::kFloat && w->is_contiguous(),
                "w_up and w_down_t must be contiguous fp32 tensors shaped like w_gate (I, H)");
  check_x(x, H);
  TORCH_CHECK(x.size(0) == 1, "moe_mlp takes one token (x of shape (1, H))");
  TORCH_CHECK(segs.dim() == 2 && segs.size(1) == 2 && segs.scalar_type() == at::kLong && segs.is_contiguous(),
              "segs must be a contiguous int64 (S, 2) tensor of [start, end) runs");
  const int64_t S = segs.size(0);
  const int64_t* sg = segs.data_ptr<int64_t>();
  std::vector<int64_t> off(S + 1, 0);  // compact index of each run's first row
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(sg[2 * s] >= (s ? sg[2 * s - 1] : 0) && sg[2 * s] <= sg[2 * s + 1] && sg[2 * s + 1] <= I,
                "segs must be ascending, disjoint [start, end) runs within [0, ", I, ")");
    off[s + 1] = off[s] + sg[2 * s + 1] - sg[2 * s];
  }
  const int64_t R = off[S];
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (R + 63) / 64));
  std::vector<float> g(I), u(I), partial(nt * H, 0.0f);  // allocated before any thread starts
  const float *X = x.data_ptr<float>(), *Wg = wg.data_ptr<float>(), *Wu = wu.data_ptr<float>(),
              *Wd = wdt.data_ptr<float>();
  auto work = [&](int64_t t) {
    const int64_t a = R * t / nt, b = R * (t + 1) / nt;  // this thread's compact rows [a, b)
    float* acc = partial.data() + t * H;
    for (int64_t s = 0; s < S; ++s) {
      const int64_t lo = std::max(a, off[s]), hi = std::min(b, off[s + 1]);
      if (lo >= hi) continue;
      const int64_t r0 = sg[2 * s] + lo - off[s], r1 = sg[2 * s] + hi - off[s];
      dense_mv(Wg, X, g.data(), H, r0, r1);
      dense_mv(Wu, X, u.data(), H, r0, r1);
      for (int64_t r = r0; r < r1; ++r) g[r] = g[r] / (1.0f + std::exp(-g[r])) * u[r];
      axpy_rows(Wd, g.data(), r0, r1, H, acc);
    }
  };
  if (nt == 1) {
    work(0);
  } else {
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) work(t);
    });
  }
  auto y = at::zeros({1, H}, x.options());
  float* Y = y.data_ptr<float>();
  for (int64_t t = 0; t < nt; ++t)
    for (int64_t c = 0; c < H; ++c) Y[c] += partial[t * H + c];
  return y;
}

}  // namespace sparseland

TORCH_LIBRARY_FRAGMENT(sparseland, m) {
  m.def("moe_mlp(Tensor x, Tensor w_gate, Tensor w_up, Tensor w_down_t, Tensor segs) -> Tensor", &sparseland::moe_mlp);
}
