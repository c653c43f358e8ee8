// Combined activation-sparse + weight-sparse matmul: Y (B, out) = X (B, in) @ WT, WT = W^T (in, out).
//
// Layout (formats.py::ActSparseBitmaskFormat): the bitmask layout of sparse.cpp applied to WT, one
// row per INPUT channel: mask (in, ceil(out/8)) uint8, bit j of byte k of row i <=> WT[i, 8k+j] != 0;
// values = the nonzeros of WT row after row (row i starts at row_ptr[i]), then 8 zeros of padding.
// A zero input x[i] skips row i entirely (activation sparsity); a kept row stores and reads only its
// nonzero weights (weight sparsity). AVX2: per mask byte, load 8 packed values, "expand" them into
// their output lanes (ExpandLUT: one permute + one blend), FMA into 8 outputs of the accumulator.
// AVX-512 (chosen at run time when the CPU has it): the same per 2 mask bytes with one vexpandps.
// The loops are in actsparse_loops.h, shared with the fused decode step's single-vector kernel.
//
// Threads split the active rows, balanced by the bytes each row reads; each thread accumulates into
// its own (B, out_pad) fp32 buffer (a few KB, stays in L1/L2) and the buffers are summed at the end.
// So a row is always walked whole by one thread and no per-chunk value offsets need storing.
#include <torch/library.h>

#include "actsparse_loops.h"
#include "common.h"

namespace sparseland {

namespace {

using actsparse_loops::accumulate;
using actsparse_loops::accumulate512;
using actsparse_loops::has_avx512;

template <typename T, int B>
void run_group(const uint8_t* mask, const int64_t* row_ptr, const T* vals, const float* X, int64_t in, int64_t out,
               int64_t out8, float* Y, bool use512) {
  constexpr int R = B == 1 ? 4 : 2;
  // Step 1: the rows with a nonzero input in any of the B batch rows, and their B inputs.
  std::vector<int64_t> act;
  std::vector<float> xa;
  std::vector<int64_t> cost{0};  // prefix sums of bytes read per active row
  act.reserve(in);
  xa.reserve(in * B);
  for (int64_t i = 0; i < in; ++i) {
    bool any = false;
    for (int b = 0; b < B; ++b) any |= X[b * in + i] != 0.0f;
    if (!any) continue;
    act.push_back(i);
    for (int b = 0; b < B; ++b) xa.push_back(X[b * in + i]);
    cost.push_back(cost.back() + (row_ptr[i + 1] - row_ptr[i]) * int64_t(sizeof(T)) + out8 + 64);
  }
  const int64_t na = static_cast<int64_t>(act.size()), out_pad = out8 * 8;
  // Step 2: split the active rows into parts of about equal cost, one per thread.
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), na / 8));
  std::vector<int64_t> bound(parts + 1, na);
  bound[0] = 0;
  for (int64_t p = 1; p < parts; ++p)
    bound[p] = std::lower_bound(cost.begin(), cost.end(), cost.back() * p / parts) - cost.begin();
  std::vector<float> acc(parts * B * out_pad, 0.0f);
  auto work = [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      if (use512)
        accumulate512<T, B, R>(mask, row_ptr, vals, act.data(), xa.data(), bound[p], bound[p + 1], out8, 0, out8,
                               acc.data() + p * B * out_pad, out_pad);
      else
        accumulate<T, B, R>(mask, row_ptr, vals, act.data(), xa.data(), bound[p], bound[p + 1], out8, 0, out8,
                            acc.data() + p * B * out_pad, out_pad);
  };
  if (parts == 1) work(0, 1);
  else at::parallel_for(0, parts, 1, work);
  // Step 3: sum the per-thread accumulators into Y (B, out).
  for (int b = 0; b < B; ++b) {
    float* y = Y + b * out;
    const float* s0 = acc.data() + b * out_pad;
    std::copy(s0, s0 + out, y);
    for (int64_t p = 1; p < parts; ++p) {
      const float* s = acc.data() + (p * B + b) * out_pad;
      for (int64_t c = 0; c < out; ++c) y[c] += s[c];
    }
  }
}

}  // namespace

// avx512: -1 = use it if the CPU has it, 0 = AVX2 path (for tests and comparisons), 1 = require it.
at::Tensor actsparse_bitmask_mm(at::Tensor mask, at::Tensor row_ptr, at::Tensor values, at::Tensor x, int64_t out,
                                int64_t avx512) {
  TORCH_CHECK(avx512 != 1 || has_avx512(), "actsparse_bitmask_mm: avx512=1 but this CPU lacks AVX-512 F/VL/BW/DQ");
  const bool use512 = avx512 == 1 || (avx512 == -1 && has_avx512());
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous(),
              "actsparse_bitmask_mm: mask must be a contiguous (in, ceil(out/8)) uint8 tensor");
  const int64_t in = mask.size(0), out8 = mask.size(1);
  TORCH_CHECK(out >= 0 && (out + 7) / 8 == out8, "actsparse_bitmask_mm: out=", out, " does not match mask width ", out8);
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.is_contiguous() && row_ptr.numel() == in + 1,
              "actsparse_bitmask_mm: row_ptr must be a contiguous int64 (in+1,) tensor");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous() && values.numel() >= row_ptr[in].item<int64_t>() + 8,
              "actsparse_bitmask_mm: values must be 1-D, contiguous and padded with 8 zeros");
  check_x(x, in);
  const int64_t B = x.size(0);
  auto y = at::empty({B, out}, x.options());
  const uint8_t* M = mask.data_ptr<uint8_t>();
  const int64_t* R = row_ptr.data_ptr<int64_t>();
  const float* X = x.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  auto run = [&](auto* V) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(V)>>;
    for (int64_t b0 = 0; b0 < B;) {  // batch rows in groups of 4, 2, 1: one pass over the weights per group
      const int64_t nb = B - b0 >= 4 ? 4 : (B - b0 >= 2 ? 2 : 1);
      const float* Xb = X + b0 * in;
      float* Yb = Y + b0 * out;
      if (nb == 4) run_group<T, 4>(M, R, V, Xb, in, out, out8, Yb, use512);
      else if (nb == 2) run_group<T, 2>(M, R, V, Xb, in, out, out8, Yb, use512);
      else run_group<T, 1>(M, R, V, Xb, in, out, out8, Yb, use512);
      b0 += nb;
    }
  };
  if (values.scalar_type() == at::kFloat) run(values.data_ptr<float>());
  else if (values.scalar_type() == at::kBFloat16) run(values.data_ptr<at::BFloat16>());
  else TORCH_CHECK(false, "actsparse_bitmask_mm: values must be float32 or bfloat16");
  return y;
}

}  // namespace sparseland

TORCH_LIBRARY_FRAGMENT(sparseland, m) {
  m.def("actsparse_bitmask_mm(Tensor mask, Tensor row_ptr, Tensor values, Tensor x, int out, int avx512=-1) -> Tensor",
        &sparseland::actsparse_bitmask_mm);
}
