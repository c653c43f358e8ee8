// Benchmark helper (benchmarks/bench_qsparse.py): one "model pass" of single-vector matvecs over a list
// of weights, timed in C++ so the Python op-call overhead (~several us per call) does not blur kernels
// that take tens of microseconds. Rows are split over torch's threads with parallel_rows, as the ops
// and the fused step's mode 0 do. Not used by the library itself.
#include <torch/library.h>

#include <chrono>
#include <string>

#include "common.h"
#include "matvec.h"
#include "qmatvec.h"
#include "qsparse.h"

namespace sparseland {
namespace {

// kind "dense": per weight 1 tensor (out, in) fp32 / bf16.
// kind "q4": 3 tensors (codes, scale, offset-or-empty), the dense Q4DenseFormat.
// kind "q4nm": 4 tensors (mask, codes, scale, offset-or-empty). "q4bitmask": 5 (mask, row_ptr, codes,
// scale, offset-or-empty). xs[i]: the float32 input of weight i (>= in + 8 entries). Runs `reps` passes
// after one warm-up pass; returns the mean seconds per pass.
double qsparse_bench_pass(std::string kind, std::vector<at::Tensor> t, std::vector<at::Tensor> xs, int64_t reps) {
  const int64_t per = kind == "dense" ? 1 : kind == "q4" ? 3 : (kind == "q4nm" ? 4 : (kind == "q4bitmask" ? 5 : 0));
  TORCH_CHECK(per > 0, "kind must be dense, q4, q4nm or q4bitmask");
  TORCH_CHECK((int64_t)t.size() == per * (int64_t)xs.size() && reps > 0, "need ", per, " tensors per x");
  const int64_t n = xs.size();
  int64_t max_out = 0;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& w = t[i * per];
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "first tensor of each weight must be 2-D contiguous");
    const int64_t in = kind == "dense" ? w.size(1) : (kind == "q4" ? w.size(1) * 2 : w.size(1) * 8);
    TORCH_CHECK(xs[i].scalar_type() == at::kFloat && xs[i].is_contiguous() && xs[i].numel() >= in + 8,
                "x must be float32 with in + 8 entries");
    max_out = std::max(max_out, w.size(0));
  }
  std::vector<float> y(max_out);
  auto pass = [&] {
    for (int64_t i = 0; i < n; ++i) {
      const at::Tensor* w = &t[i * per];
      const float* x = xs[i].data_ptr<float>();
      const int64_t out = w[0].size(0);
      if (kind == "dense") {
        const int64_t in = w[0].size(1);
        if (w[0].scalar_type() == at::kBFloat16) {
          const at::BFloat16* W = w[0].data_ptr<at::BFloat16>();
          parallel_rows(out, 16, [&](int64_t r0, int64_t r1) { dense_mv(W, x, y.data(), in, r0, r1); });
        } else {
          const float* W = w[0].data_ptr<float>();
          parallel_rows(out, 16, [&](int64_t r0, int64_t r1) { dense_mv(W, x, y.data(), in, r0, r1); });
        }
      } else if (kind == "q4") {
        const int64_t in = w[0].size(1) * 2, group = in / w[1].size(1);
        const at::Half* O = w[2].numel() ? w[2].data_ptr<at::Half>() : nullptr;
        parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
          q4_mv(w[0].data_ptr<uint8_t>(), w[1].data_ptr<at::Half>(), O, in, group, x, y.data(), r0, r1);
        });
      } else if (kind == "q4nm") {
        const int64_t in = w[0].size(1) * 8, group = in / w[2].size(1);
        const at::Half* O = w[3].numel() ? w[3].data_ptr<at::Half>() : nullptr;
        parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
          q4nm_mv(w[0].data_ptr<uint8_t>(), w[1].data_ptr<uint8_t>(), w[2].data_ptr<at::Half>(), O, x, y.data(), in,
                  group, r0, r1);
        });
      } else {
        const int64_t in = w[0].size(1) * 8, group = in / w[3].size(1);
        const at::Half* O = w[4].numel() ? w[4].data_ptr<at::Half>() : nullptr;
        parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
          q4bitmask_mv(w[0].data_ptr<uint8_t>(), w[1].data_ptr<int64_t>(), w[2].data_ptr<uint8_t>(),
                       w[3].data_ptr<at::Half>(), O, x, y.data(), in, group, r0, r1);
        });
      }
    }
  };
  pass();
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t r = 0; r < reps; ++r) pass();
  const auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double>(t1 - t0).count() / reps;
}

}  // namespace
}  // namespace sparseland

TORCH_LIBRARY_FRAGMENT(sparseland, m) {
  m.def("qsparse_bench_pass(str kind, Tensor[] t, Tensor[] xs, int reps) -> float", &sparseland::qsparse_bench_pass);
}
