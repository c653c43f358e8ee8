// Activation-sparse matmul: Y (B, out) = X (B, in) @ WT, WT (in, out) row-major (W transposed), so
// each zero input x[i] skips one contiguous row WT[i, :]. Threads split the output columns; each
// thread walks the active rows sixteen at a time, accumulating its column slice of y in L1 (the loops
// are actsparse_mv in actsparse_mv.cpp, which the fused decode step shares).
#include "actsparse_mv.h"
#include "common.h"

namespace sparseland {

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
        actsparse_mv(W, act.data(), xa.data(), na, yb, out, k0 * 8, std::min(out, k1 * 8));
      });
    };
    if (wt.scalar_type() == at::kFloat) run(wt.data_ptr<float>());
    else if (wt.scalar_type() == at::kBFloat16) run(wt.data_ptr<at::BFloat16>());
    else TORCH_CHECK(false, "actsparse_mm: weight dtype must be float32 or bfloat16");
  }
  return y;
}

}  // namespace sparseland
