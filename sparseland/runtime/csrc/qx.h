// Quantized x for the dense quantized kernels (qdense.cpp: Q4, q8dense.cpp: Q8): the per-vector int8
// quantization both share, its buffers, the instruction-set choice and the tiling of several vectors.
// Internal to those two files; the math and the layouts are in qdense.cpp's header comment.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>

#include "common.h"

#define QS_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c,bmi2")))

namespace sparseland::qk {

// ---- quantized x -------------------------------------------------------------------------------

struct QX {  // one quantized x vector (views into a QXBuf)
  const int8_t* xq;
  const float* dxe;
  const float* sx;  // Q4: sum of the rounded x per group (padded to a multiple of 8 with zeros)
  float c;          // Q8: 128 * sum_k dx_k * sum(xq_k)
  const int32_t* xc;  // Q8 with group scales, AVX-512: per pair of blocks, 16 int32 lanes = -128 * the sum of
                      // the 4 xq bytes of that lane (so vpdpbusd on w + 128 starting there gives sum w xq)
};

// Sizes of one quantized vector of `in` columns.
struct QXSize {
  int64_t xq, dxe, sx, xc;
};
inline QXSize q4_size(int64_t in, int64_t group) {
  const int64_t nq = (in / 32 + 3) / 4;
  return {nq * 128, nq * 16, (in / group + 7) / 8 * 8 + 8, 0};
}
inline QXSize q8_size(int64_t in) {
  const int64_t np = ((in + 31) / 32 + 1) / 2;
  return {np * 64, np * 16, 0, np * 16};
}

struct QXBuf {
  std::vector<int8_t> xq;
  std::vector<float> dxe, sx, c;
  std::vector<int32_t> xc;
  void fit(QXSize s, int64_t n) {  // grows only
    if (int64_t(xq.size()) < s.xq * n) xq.resize(s.xq * n);
    if (int64_t(dxe.size()) < s.dxe * n) dxe.resize(s.dxe * n);
    if (int64_t(sx.size()) < s.sx * n) sx.resize(s.sx * n);
    if (int64_t(xc.size()) < s.xc * n) xc.resize(s.xc * n);
    if (int64_t(c.size()) < n) c.resize(n);
  }
  QX view(QXSize s, int64_t i) const {
    return {xq.data() + s.xq * i, dxe.data() + s.dxe * i, sx.data() + s.sx * i, c[i], xc.data() + s.xc * i};
  }
};

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline int hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// One block: x[0, n) (n <= 32, the rest taken as 0) -> 32 int8 at out (natural order); returns dx,
// the float sum of the block and the sum of its int8 values.
inline void quant_block(const float* x, int64_t n, int8_t* out, float& dx, float& fsum, int& isum) {
  alignas(32) float tmp[32];
  if (n < 32) {
    std::memset(tmp, 0, sizeof(tmp));
    std::memcpy(tmp, x, n * sizeof(float));
    x = tmp;
  }
  const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
               v3 = _mm256_loadu_ps(x + 24);
  const __m256 sign = _mm256_set1_ps(-0.0f);
  const __m256 a = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                 _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
  const float amax = hmax(a);
  dx = amax / 127.0f;
  const __m256 id = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
  auto q = [&](__m256 v) {
    return _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  };
  const __m256i i0 = q(v0), i1 = q(v1), i2 = q(v2), i3 = q(v3);
  isum = hsum_i32(_mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3)));
  fsum = hsum(_mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3)));
  // packs interleave 128-bit lanes: [i0 lo, i1 lo, i0 hi, i1 hi] -> bytes in order 0 4 1 5 2 6 3 7 (dwords)
  const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permutevar8x32_epi32(p, perm));
}

// x (in,) -> Q4 layout (see the header comment); in % 32 == 0, in % group == 0.
inline void quantize_q4(const float* x, int64_t in, int64_t group, int8_t* xq, float* dxe, float* sx, int64_t sx_len) {
  const int64_t nblk = in / 32, nq = (nblk + 3) / 4, bpg = group / 32;
  std::memset(sx, 0, sx_len * sizeof(float));
  alignas(32) int8_t blk[32];
  for (int64_t k = 0; k < 4 * nq; ++k) {
    const int64_t q = k / 4, i = k % 4;
    float dx = 0.0f, fs = 0.0f;
    int is = 0;
    if (k < nblk) {
      quant_block(x + 32 * k, 32, blk, dx, fs, is);
      sx[k / bpg] += dx * float(is);  // the rounded block's sum: y = W @ x_rounded exactly (llama.cpp's Q8_1 s)
    } else {
      std::memset(blk, 0, 32);
    }
    std::memcpy(xq + 128 * q + 16 * i, blk, 16);
    std::memcpy(xq + 128 * q + 64 + 16 * i, blk + 16, 16);
    for (int j = 0; j < 4; ++j) dxe[16 * q + 4 * i + j] = dx;
  }
}

// x (in,) -> Q8 layout; returns the constant c = 128 * sum_k dx_k * sum(xq_k); xc (see QX) if not null.
inline float quantize_q8(const float* x, int64_t in, int8_t* xq, float* dxe, int32_t* xc) {
  const int64_t nblk = (in + 31) / 32, np = (nblk + 1) / 2;
  double c = 0.0;
  for (int64_t k = 0; k < 2 * np; ++k) {
    float dx = 0.0f, fs = 0.0f;
    int is = 0;
    if (k < nblk) quant_block(x + 32 * k, std::min<int64_t>(32, in - 32 * k), xq + 32 * k, dx, fs, is);
    else std::memset(xq + 32 * k, 0, 32);
    c += double(dx) * is;
    for (int j = 0; j < 8; ++j) dxe[8 * k + j] = dx;
  }
  if (xc != nullptr)
    for (int64_t l = 0; l < 16 * np; ++l)
      xc[l] = -128 * (int32_t(xq[4 * l]) + xq[4 * l + 1] + xq[4 * l + 2] + xq[4 * l + 3]);
  return float(128.0 * c);
}

inline float h2f(uint16_t h) { return _cvtsh_ss(h); }

// 0: AVX2, 1: AVX-512 VNNI. Chosen once per process (qdense.cpp): the CPU's features, unless
// SPARSELAND_QUANT_ISA=avx2.
int quant_isa();

// Apply a kernel family over B vectors in tiles of up to NBMAX (8 or 4), then 2, then 1.
template <typename Get, typename Run>
void tiles(int64_t B, int nbmax, const Get& get, const Run& run) {
  for (int64_t b0 = 0; b0 < B;) {
    const int64_t left = B - b0;
    const int nb = left >= nbmax ? nbmax : (left >= 4 ? 4 : (left >= 2 ? 2 : 1));
    run(get(nb), b0);
    b0 += nb;
  }
}


inline void check_q_x(const at::Tensor& x, int64_t in, const char* op) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(), op,
              ": x must be a contiguous float32 (B, in) tensor, got ", x.scalar_type(), " with shape ", x.sizes());
  TORCH_CHECK(x.size(1) == in, op, ": x has ", x.size(1), " features, the weight expects ", in);
}

}  // namespace sparseland::qk
