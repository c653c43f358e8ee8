// Sparse-weight matmuls, Y (B, out) = X (B, in) @ W^T, fp32 accumulate, values fp32 or bf16.
//
// bitmask: mask (out, ceil(in/8)) uint8, bit j of byte k = W[r, 8k+j] != 0; values packed row after
//   row (row r starts at row_ptr[r]), padded with 8 trailing zeros. Per mask byte: load 8 packed
//   values, "expand" them into their lanes with one permute + and, FMA with 8 contiguous x.
// nm (4 kept per byte: 2:4, 4:8): same mask, but every byte has exactly 4 bits set, so row r's values
//   start at r * ceil(in/8) * 4. Per pair of bytes: "compress" the 16 x values to the 8 kept ones
//   with two permutes, one FMA with 8 contiguous values; no popcount chain, no masking.
#include "common.h"
#include "matvec.h"

namespace sparseland {

template <typename T, int B>
static void bitmask_rows(const uint8_t* mask, const int64_t* row_ptr, const T* vals, const float* X, float* Y,
                         int64_t in8, int64_t in_pad, int64_t out, int64_t r0, int64_t r1) {
  // U independent accumulator sets hide the FMA latency (one FMA chain per set).
  constexpr int U = B == 1 ? 4 : (B == 2 ? 2 : 1);
  const ExpandLUT& lut = expand_lut();
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * in8;
    const T* v = vals + row_ptr[r];
    __m256 acc[U][B];
    for (int u = 0; u < U; ++u)
      for (int b = 0; b < B; ++b) acc[u][b] = _mm256_setzero_ps();
    const __m256 zero = _mm256_setzero_ps();
    auto chunk = [&](int64_t k, __m256* a) {
      const unsigned byte = m[k];
      __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[byte]));
      __m256 w = _mm256_blendv_ps(_mm256_permutevar8x32_ps(load8(v), idx), zero, _mm256_castsi256_ps(idx));
      v += _mm_popcnt_u32(byte);
      for (int b = 0; b < B; ++b) a[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(X + b * in_pad + 8 * k), a[b]);
    };
    int64_t k = 0;
    for (; k + U <= in8; k += U)
      for (int u = 0; u < U; ++u) chunk(k + u, acc[u]);
    for (; k < in8; ++k) chunk(k, acc[0]);
    for (int b = 0; b < B; ++b) {
      __m256 s = acc[0][b];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][b]);
      Y[b * out + r] = hsum(s);
    }
  }
}

template <typename T>
static void nm4_rows(const uint8_t* mask, const T* vals, const float* X, float* Y, int64_t Bt, int64_t in8,
                     int64_t in_pad, int64_t out, int64_t r0, int64_t r1) {
  const CompressLUT& lut = compress_lut();
  const int64_t pairs = in8 / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * in8;
    const T* v = vals + r * in8 * 4;
    for (int64_t b = 0; b < Bt; ++b) {
      const float* x = X + b * in_pad;
      __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
      int64_t p = 0;
      for (; p + 4 <= pairs; p += 4) {
        for (int u = 0; u < 4; ++u) {
          const int64_t k = 2 * (p + u);
          __m256 ca = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8 * k),
                                               _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[m[k]])));
          __m256 cb = _mm256_permutevar8x32_ps(
              _mm256_loadu_ps(x + 8 * k + 8), _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[m[k + 1]])));
          __m256 xc = _mm256_insertf128_ps(ca, _mm256_castps256_ps128(cb), 1);
          acc[u] = _mm256_fmadd_ps(load8(v + 4 * k), xc, acc[u]);
        }
      }
      for (int64_t k = 2 * p; k < in8; k += 2) {
        __m256 ca = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8 * k),
                                             _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[m[k]])));
        __m128 hi = _mm_setzero_ps();
        if (k + 1 < in8)
          hi = _mm256_castps256_ps128(_mm256_permutevar8x32_ps(
              _mm256_loadu_ps(x + 8 * k + 8), _mm256_load_si256(reinterpret_cast<const __m256i*>(lut.idx[m[k + 1]]))));
        acc[0] = _mm256_fmadd_ps(load8(v + 4 * k), _mm256_insertf128_ps(ca, hi, 1), acc[0]);
      }
      Y[b * out + r] = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    }
  }
}

// Single-vector entry points for the fused decode step (x padded to in8 * 8 floats, y[r] for r in [r0, r1)).
void bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const float* vals, const float* x, float* y, int64_t in8,
                int64_t r0, int64_t r1) {
  bitmask_rows<float, 1>(mask, row_ptr, vals, x, y, in8, in8 * 8, 0, r0, r1);
}
void bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const at::BFloat16* vals, const float* x, float* y,
                int64_t in8, int64_t r0, int64_t r1) {
  bitmask_rows<at::BFloat16, 1>(mask, row_ptr, vals, x, y, in8, in8 * 8, 0, r0, r1);
}
void nm4_mv(const uint8_t* mask, const float* vals, const float* x, float* y, int64_t in8, int64_t r0, int64_t r1) {
  nm4_rows(mask, vals, x, y, 1, in8, in8 * 8, 0, r0, r1);
}
void nm4_mv(const uint8_t* mask, const at::BFloat16* vals, const float* x, float* y, int64_t in8, int64_t r0,
            int64_t r1) {
  nm4_rows(mask, vals, x, y, 1, in8, in8 * 8, 0, r0, r1);
}

at::Tensor bitmask_mm(at::Tensor mask, at::Tensor row_ptr, at::Tensor values, at::Tensor x) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous(), "bad mask");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.numel() == mask.size(0) + 1, "bad row_ptr");
  const int64_t out = mask.size(0), in8 = mask.size(1), in_pad = in8 * 8, B = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= in_pad && x.size(1) > in_pad - 8, "x does not match the mask width");
  TORCH_CHECK(values.numel() >= row_ptr[out].item<int64_t>() + 8, "values must be padded with 8 zeros");
  auto xc = x.contiguous().to(at::kFloat);
  std::vector<float> X = padded_input(xc, in_pad);
  auto y = at::empty({B, out}, xc.options());
  const uint8_t* M = mask.data_ptr<uint8_t>();
  const int64_t* R = row_ptr.data_ptr<int64_t>();
  float* Y = y.data_ptr<float>();
  auto run = [&](auto* V) {
    using T = std::remove_const_t<std::remove_pointer_t<decltype(V)>>;
    for (int64_t b0 = 0; b0 < B;) {
      const int64_t nb = B - b0 >= 4 ? 4 : (B - b0 >= 2 ? 2 : 1);
      const float* Xb = X.data() + b0 * in_pad;
      float* Yb = Y + b0 * out;
      parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
        if (nb == 4) bitmask_rows<T, 4>(M, R, V, Xb, Yb, in8, in_pad, out, r0, r1);
        else if (nb == 2) bitmask_rows<T, 2>(M, R, V, Xb, Yb, in8, in_pad, out, r0, r1);
        else bitmask_rows<T, 1>(M, R, V, Xb, Yb, in8, in_pad, out, r0, r1);
      });
      b0 += nb;
    }
  };
  if (values.scalar_type() == at::kFloat) run(values.data_ptr<float>());
  else if (values.scalar_type() == at::kBFloat16) run(values.data_ptr<at::BFloat16>());
  else TORCH_CHECK(false, "values must be float32 or bfloat16");
  return y;
}

at::Tensor nm4_mm(at::Tensor mask, at::Tensor values, at::Tensor x) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous(), "bad mask");
  const int64_t out = mask.size(0), in8 = mask.size(1), in_pad = in8 * 8, B = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= in_pad && x.size(1) > in_pad - 8, "x does not match the mask width");
  TORCH_CHECK(values.numel() >= out * in8 * 4 + 8, "values must hold 4 per mask byte plus 8 zeros of padding");
  auto xc = x.contiguous().to(at::kFloat);
  std::vector<float> X = padded_input(xc, in_pad);
  auto y = at::empty({B, out}, xc.options());
  const uint8_t* M = mask.data_ptr<uint8_t>();
  float* Y = y.data_ptr<float>();
  auto run = [&](auto* V) {
    parallel_rows(out, 16, [&](int64_t r0, int64_t r1) { nm4_rows(M, V, X.data(), Y, B, in8, in_pad, out, r0, r1); });
  };
  if (values.scalar_type() == at::kFloat) run(values.data_ptr<float>());
  else if (values.scalar_type() == at::kBFloat16) run(values.data_ptr<at::BFloat16>());
  else TORCH_CHECK(false, "values must be float32 or bfloat16");
  return y;
}

}  // namespace sparseland
