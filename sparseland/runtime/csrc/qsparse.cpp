// Sparse + 4-bit weight matmuls (layout, math and the single-vector contract: qsparse.h).
//
// Per row the kernels first unpack the row's kept codes into one byte each (thread_local scratch,
// L1-resident) and convert its fp16 scales / offsets to fp32; with B > 1 vectors this is done once per
// row and the row is then dotted with every quantized x (the weight row is read from memory once).
//
// AVX-512 (VNNI + VBMI2, chosen at run time; the build stays -march=haswell):
//   q4nm, 128 columns per step: the 64 kept codes are contiguous; vpcompressb squeezes x's 2 x 64
//     columns to the 2 x 32 kept ones (mask bytes drive it), one vpdpbusd (codes u8 x xq s8) gives
//     16 int32 lanes, lane l = kept 4l..4l+3 = columns 8l..8l+7, so lanes 4b..4b+3 are x block b.
//     The integer dot work is per kept value (64 per vpdpbusd); masks, x loads and compresses are per column.
//   q4bitmask, 64 columns per step: vpexpandb scatters the step's kept codes (a variable count,
//     popcount of the 64 mask bits) to their columns (zeros elsewhere) and vpdpbusd multiplies with x
//     as is: lanes 0-7 are x block 0, 8-15 block 1. Here all vector work is per column (64 per step at any
//     density), so higher sparsity saves only bytes and code unpacking: the kernel is compute-bound on
//     Zen 4 and 50% vs 70% sparsity differ little (benchmarks/results/qsparse.md).
//   Both, asymmetric: a second vpdpbusd (ones at kept columns) gives sum_kept xq for the offset term, then
//     acc += (d * Q + m * S) * s per lane (d, m, s permuted to the lanes' group / block).
//   Symmetric (m = -8 d): q4bitmask expands with code 8 in the pruned columns (value 0 after the -8 d
//     offset), so one vpdpbusd per step and the offset term is -8 sum_G d_G S_G once per row (S_G: x's
//     group sums, once per call); q4nm subtracts 8 S in the integer lanes before the one conversion.
// AVX2 (+FMA, F16C), both formats, 32 columns (one x block) per step: vpshufb expands the kept codes
//   to their columns from a 256-entry table of 8 byte indices per mask byte, vpmaddubsw + vpmaddwd
//   with xq, the same for sum_kept xq, then acc += Q * (d s) + S * (m s).
#include "qsparse.h"

#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>
#include <string>

#include "common.h"
#include "qmatvec.h"

namespace sparseland {
namespace {

constexpr int64_t XB = 32;    // columns per x quantization block
constexpr int64_t XPAD = 128;  // zero bytes / floats after quantized x, codes and scales (full-vector reads)

// ---- ISA choice ------------------------------------------------------------------------------------

enum Isa : int { kAvx2 = 0, kAvx512 = 1 };

bool cpu_has_avx512() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("bmi2");
  }();
  return ok;
}

std::atomic<int> g_isa{-1};  // -1: not chosen yet
// The symmetric kernels (AVX2 and AVX-512: fill / joined offset) and the AVX2 expand-once rows (several vectors)
// are on unless this is off: an ablation switch for benchmarks/bench_qsparse.py, which then runs the per-step
// kernels they replace.
std::atomic<bool> g_fill_kernels{true};

int quant_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v >= 0) return v;
  const char* env = std::getenv("SPARSELAND_QUANT_ISA");
  v = (env != nullptr && std::strcmp(env, "avx2") == 0) || !cpu_has_avx512() ? kAvx2 : kAvx512;
  g_isa.store(v, std::memory_order_relaxed);
  return v;
}

// ---- x quantization (AVX2; identical results on both paths) -----------------------------------------

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}

// Floats of one quantized x's scale area (xs_len): the in/32 block scales s_b, 16 zeros, then the
// per-lane scales of the AVX-512 steps, so the kernels load them instead of permuting:
//   lanes64(xs, in)  + 16 t: 64-column step t, lanes 0-7 = s_{2t}, 8-15 = s_{2t+1}   (q4bitmask)
//   lanes128(xs, in) + 16 t: 128-column step t, lanes 4j..4j+3 = s_{4t+j}            (q4nm)
//   bsums(xs, in) + b: s_b * sum_{c in b} xq[c] (the symmetric fill kernels' offset term), then 16 zeros
inline int64_t xs_len(int64_t in) {
  return in / XB + 16 + (in / 64 + 1) * 16 + (in / 128 + 1) * 16 + in / XB + 16 + XPAD;
}
inline const float* lanes64(const float* xs, int64_t in) { return xs + in / XB + 16; }
inline const float* lanes128(const float* xs, int64_t in) { return lanes64(xs, in) + (in / 64 + 1) * 16; }
inline const float* bsums(const float* xs, int64_t in) { return lanes128(xs, in) + (in / 128 + 1) * 16; }

// x (in,) fp32 -> xq (in,) int8 and xs (xs_len(in),) fp32 block scales and lane scales; in % 32 == 0.
void quantize_x(const float* x, int64_t in, int8_t* xq, float* xs) {
  const int64_t nb = in / XB;
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t b = 0; b < in / XB; ++b) {
    const float* p = x + b * XB;
    __m256 v0 = _mm256_loadu_ps(p), v1 = _mm256_loadu_ps(p + 8), v2 = _mm256_loadu_ps(p + 16),
           v3 = _mm256_loadu_ps(p + 24);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_and_ps(v0, absmask), _mm256_and_ps(v1, absmask)),
                              _mm256_max_ps(_mm256_and_ps(v2, absmask), _mm256_and_ps(v3, absmask)));
    const float amax = hmax(mx);
    xs[b] = amax / 127.0f;
    const __m256 is = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    // round half to even (default MXCSR), then pack 4 x 8 int32 -> 32 int8 in order
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, is)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, is));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, is)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, is));
    __m256i q = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    q = _mm256_max_epi8(q, _mm256_set1_epi8(-127));  // NaN/inf inputs saturate; keep the +-127 grid
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + b * XB), _mm256_permutevar8x32_epi32(q, perm));
  }
  for (int64_t b = nb; b < nb + 16; ++b) xs[b] = 0.0f;
  float* l64 = xs + nb + 16;
  for (int64_t t = 0; t <= in / 64; ++t)
    for (int l = 0; l < 16; ++l) l64[16 * t + l] = xs[2 * t + l / 8];
  float* l128 = l64 + (in / 64 + 1) * 16;
  for (int64_t t = 0; t <= in / 128; ++t)
    for (int l = 0; l < 16; ++l) l128[16 * t + l] = xs[4 * t + l / 4];
  float* bs = l128 + (in / 128 + 1) * 16;
  for (int64_t b = 0; b < nb; ++b) {
    int32_t sum = 0;
    for (int64_t c = 0; c < XB; ++c) sum += xq[b * XB + c];
    bs[b] = xs[b] * static_cast<float>(sum);
  }
  for (int64_t b = nb; b < nb + 16; ++b) bs[b] = 0.0f;
}

// ---- per-row preparation ----------------------------------------------------------------------------

// The kept codes of one row (n codes in the chunked-nibble layout at src) -> dst[0, n) one per byte.
// Reads exactly ceil(n / 2) bytes of src; writes up to dst[n + 32).
void unpack_codes(const uint8_t* src, int64_t n, uint8_t* dst) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  for (int64_t i = 0; i < n; i += 64) {
    const int64_t cnt = std::min<int64_t>(64, n - i), h = (cnt + 1) / 2;
    __m256i v;
    if (h == 32) {
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
    } else {
      alignas(32) uint8_t tmp[32] = {0};
      std::memcpy(tmp, src, h);
      v = _mm256_load_si256(reinterpret_cast<const __m256i*>(tmp));
    }
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm256_and_si256(v, lo4));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + h), _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4));
    src += h;
    dst += cnt;
  }
}

// G fp16 scales (and offsets, or -8 d if symmetric) -> fp32 d[0, G), m[0, G).
void convert_scales(const at::Half* scale, const at::Half* offset, int64_t G, float* d, float* m) {
  const uint16_t* s16 = reinterpret_cast<const uint16_t*>(scale);
  const uint16_t* o16 = reinterpret_cast<const uint16_t*>(offset);
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) {
    __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s16 + g)));
    _mm256_storeu_ps(d + g, dv);
    _mm256_storeu_ps(m + g, offset ? _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(o16 + g)))
                                   : _mm256_mul_ps(dv, _mm256_set1_ps(-8.0f)));
  }
  for (; g < G; ++g) {
    d[g] = _cvtsh_ss(s16[g]);
    m[g] = offset ? _cvtsh_ss(o16[g]) : d[g] * -8.0f;
  }
}

inline int64_t popcount_row(const uint8_t* mrow, int64_t in8) {
  int64_t n = 0, k = 0;
  for (; k + 8 <= in8; k += 8) {
    uint64_t w;
    std::memcpy(&w, mrow + k, 8);
    n += _mm_popcnt_u64(w);
  }
  for (; k < in8; ++k) n += _mm_popcnt_u32(mrow[k]);
  return n;
}

// The number of kept codes of bitmask row r (popcount of its mask), or -1 if its byte count in row_ptr is not
// ceil(n / 2): such a row must not be read (its codes would run into the next row's or past the end).
inline int64_t bitmask_row_codes(const uint8_t* mrow, const int64_t* row_ptr, int64_t r, int64_t in8) {
  const int64_t n = popcount_row(mrow, in8);
  return row_ptr[r + 1] - row_ptr[r] == (n + 1) / 2 ? n : -1;
}

// Per-thread scratch: unpacked codes of the current row, its fp32 scales, and (single-vector entry
// points) the quantized x. Grown, never shrunk; no allocation once large enough.
struct Scratch {
  std::vector<uint8_t> codes, dense, kept;  // dense / kept: a row expanded to one byte per column (B > 1)
  std::vector<float> d, m, xs, gsum;        // gsum: per vector, S_G = sum_{b in G} bsum_b (symmetric fill)
  std::vector<int8_t> xq;
  void fit(int64_t in) {
    if ((int64_t)codes.size() >= in + XPAD) return;
    codes.assign(in + XPAD, 0);
    dense.assign(in + XPAD, 0);
    kept.assign(in + XPAD, 0);
    d.assign(in / XB + XPAD, 0.0f);
    m.assign(in / XB + XPAD, 0.0f);
    xs.assign(xs_len(in), 0.0f);
    xq.assign(in + XPAD, 0);
  }
};
Scratch& scratch(int64_t in) {
  thread_local Scratch s;
  s.fit(in);
  return s;
}

// ---- AVX2 row dot (both formats) --------------------------------------------------------------------

// Byte j of entry k: rank of bit j among the set bits of k if set, else 0x80 (vpshufb writes 0).
struct ShufLUT {
  uint64_t idx[256];
  ShufLUT() {
    for (int k = 0; k < 256; ++k) {
      uint64_t v = 0;
      int r = 0;
      for (int j = 0; j < 8; ++j) {
        uint64_t b = ((k >> j) & 1) ? static_cast<uint64_t>(r++) : 0x80u;
        v |= b << (8 * j);
      }
      idx[k] = v;
    }
  }
};
const ShufLUT& shuf_lut() {
  static const ShufLUT lut;
  return lut;
}

// The 32 columns [c, c + 32) of a row (mask bits k): codes from cu[pos..] to their columns; pruned lanes get
// 0x80 in idx. E: shuf_lut().idx, read once per row (a function-local static's guard inside the loop would
// make the compiler keep the accumulators in memory).
struct Expanded {
  __m256i cv, idx;
};
// NM: every mask byte has exactly 4 bits (q4nm), so the offsets are constants and no popcount is taken.
template <bool NM>
__attribute__((always_inline)) inline Expanded expand32_avx2(const uint64_t* E, uint32_t k, const uint8_t* cu,
                                                             int64_t pos) {
  constexpr uint64_t kOnes = 0x0101010101010101ull;
  const unsigned m0 = k & 0xFF, m1 = (k >> 8) & 0xFF, m2 = (k >> 16) & 0xFF, m3 = k >> 24;
  const unsigned c0 = NM ? 4 : _mm_popcnt_u32(m0), c01 = NM ? 8 : _mm_popcnt_u32(k & 0xFFFF);
  const unsigned c2 = NM ? 4 : _mm_popcnt_u32(m2);
  const __m128i ilo = _mm_set_epi64x(static_cast<int64_t>(E[m1] + c0 * kOnes), static_cast<int64_t>(E[m0]));
  const __m128i ihi = _mm_set_epi64x(static_cast<int64_t>(E[m3] + c2 * kOnes), static_cast<int64_t>(E[m2]));
  const __m256i idx = _mm256_set_m128i(ihi, ilo);
  return {_mm256_shuffle_epi8(_mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(cu + pos + c01),
                                                  reinterpret_cast<const __m128i*>(cu + pos)),
                              idx),
          idx};
}

inline __m256i dot32_avx2(__m256i cv, const int8_t* xq) {  // 8 int32 lanes of cv . xq (cv <= 15)
  const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
  return _mm256_madd_epi16(_mm256_maddubs_epi16(cv, xv), _mm256_set1_epi16(1));
}

// 1 in the kept lanes of an expansion, 0 in the pruned ones.
inline __m256i kept01(__m256i idx) {
  return _mm256_and_si256(_mm256_cmpgt_epi8(idx, _mm256_set1_epi8(-1)), _mm256_set1_epi8(1));
}

// acc + float(q) * scale: one block of 32 columns' integer dot into the float accumulator.
inline __m256 fma_block(__m256i q, float scale, __m256 acc) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), _mm256_set1_ps(scale), acc);
}

// sum_c W[r, c] x[c] for one row: mask row mrow, unpacked codes cu, fp32 d/m per group (1 << gshift
// columns), quantized x (xq, xs).
float row_dot_avx2(const uint8_t* mrow, const uint8_t* cu, const float* d, const float* m, int gshift, const int8_t* xq,
                   const float* xs, int64_t in) {
  const uint64_t* E = shuf_lut().idx;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t pos = 0;
  for (int64_t c = 0; c < in; c += XB) {
    uint32_t k;
    std::memcpy(&k, mrow + c / 8, 4);
    const Expanded e = expand32_avx2<false>(E, k, cu, pos);
    pos += _mm_popcnt_u32(k);
    const float sb = xs[c / XB];
    const int64_t G = c >> gshift;
    acc0 = fma_block(dot32_avx2(e.cv, xq + c), d[G] * sb, acc0);  // codes <= 15: no saturation
    acc1 = fma_block(dot32_avx2(kept01(e.idx), xq + c), m[G] * sb, acc1);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

// ---- AVX2 fill kernels (symmetric schemes) and expand-once rows (several vectors) --------------------------
//
// Symmetric (m = -8 d): a pruned column expanded to code 8 has the value d (8 - 8) = 0, so the expanded row is
// a dense int4 row and W x = sum_b s_b d_G sum_c q xq - 8 sum_G d_G S_G with S_G = sum_{b in G} s_b sum_c xq,
// the same for every row (gsum, once per call): no sum_kept xq per step. With several vectors (prefill) each
// row is expanded once to one byte per column (and, asymmetric, a kept byte per column) and then dotted with
// every vector, instead of re-deriving the shuffle per vector.


// sum_{g < G} d[g] gsum[g]
inline float dot_groups(const float* d, const float* gsum, int64_t G) {
  __m256 a = _mm256_setzero_ps();
  int64_t g = 0;
  for (; g + 8 <= G; g += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(d + g), _mm256_loadu_ps(gsum + g), a);
  float r = hsum(a);
  for (; g < G; ++g) r += d[g] * gsum[g];
  return r;
}

// gsum[g] = sum of bsums over group g's blocks (1 << (gshift - 5) blocks per group).
inline void group_sums(const float* xs, int64_t in, int gshift, float* gsum) {
  const float* bs = bsums(xs, in);
  const int64_t per = int64_t(1) << (gshift - 5), G = in >> gshift;
  for (int64_t g = 0; g < G; ++g) {
    float t = 0.0f;
    for (int64_t j = 0; j < per; ++j) t += bs[g * per + j];
    gsum[g] = t;
  }
}


// One row, one vector, symmetric: the fill expansion in registers.
template <bool NM>
float row_dot_sym_avx2(const uint8_t* mrow, const uint8_t* cu, const float* d, int gshift, const int8_t* xq,
                       const float* xs, int64_t in, const float* gsum) {
  const uint64_t* E = shuf_lut().idx;
  const __m256i eight = _mm256_set1_epi8(8);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t pos = 0;
  uint64_t c = 0;
  const uint64_t n = static_cast<uint64_t>(in);
  for (; c + 2 * XB <= n; c += 2 * XB) {  // two independent steps per iteration
    uint32_t k0, k1;
    std::memcpy(&k0, mrow + c / 8, 4);
    std::memcpy(&k1, mrow + c / 8 + 4, 4);
    const int64_t n0 = NM ? 16 : _mm_popcnt_u32(k0), n1 = NM ? 16 : _mm_popcnt_u32(k1);
    const Expanded e0 = expand32_avx2<NM>(E, k0, cu, pos);
    const Expanded e1 = expand32_avx2<NM>(E, k1, cu, pos + n0);
    pos += n0 + n1;
    const __m256i q0 = dot32_avx2(_mm256_blendv_epi8(e0.cv, eight, e0.idx), xq + c);
    const __m256i q1 = dot32_avx2(_mm256_blendv_epi8(e1.cv, eight, e1.idx), xq + c + XB);
    acc0 = fma_block(q0, d[c >> gshift] * xs[c / XB], acc0);
    acc1 = fma_block(q1, d[(c + XB) >> gshift] * xs[c / XB + 1], acc1);
  }
  if (c < n) {
    uint32_t k;
    std::memcpy(&k, mrow + c / 8, 4);
    const Expanded e0 = expand32_avx2<NM>(E, k, cu, pos);
    const __m256i q0 = dot32_avx2(_mm256_blendv_epi8(e0.cv, eight, e0.idx), xq + c);
    acc0 = fma_block(q0, d[c >> gshift] * xs[c / XB], acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1)) - 8.0f * dot_groups(d, gsum, in >> gshift);
}

// A row expanded once: dense[c] = its code (kept) or the fill (pruned: 8 symmetric, 0 asymmetric); kept[c] =
// 1 / 0 (asymmetric only).
template <bool NM>
void expand_row_avx2(const uint8_t* mrow, const uint8_t* cu, int64_t in, bool sym, uint8_t* dense, uint8_t* kept) {
  const uint64_t* E = shuf_lut().idx;
  const __m256i eight = _mm256_set1_epi8(8);
  int64_t pos = 0;
  for (int64_t c = 0; c < in; c += XB) {
    uint32_t k;
    std::memcpy(&k, mrow + c / 8, 4);
    const Expanded e = expand32_avx2<NM>(E, k, cu, pos);
    pos += NM ? 16 : _mm_popcnt_u32(k);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dense + c), sym ? _mm256_blendv_epi8(e.cv, eight, e.idx) : e.cv);
    if (!sym)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(kept + c), kept01(e.idx));
  }
}

float dense_dot_sym_avx2(const uint8_t* dense, const float* d, int gshift, const int8_t* xq, const float* xs,
                         int64_t in, const float* gsum) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 2 * XB <= in; c += 2 * XB) {
    const __m256i q0 = dot32_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dense + c)), xq + c);
    const __m256i q1 = dot32_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dense + c + XB)), xq + c + XB);
    acc0 = fma_block(q0, d[c >> gshift] * xs[c / XB], acc0);
    acc1 = fma_block(q1, d[(c + XB) >> gshift] * xs[c / XB + 1], acc1);
  }
  if (c < in) {
    const __m256i q0 = dot32_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dense + c)), xq + c);
    acc0 = fma_block(q0, d[c >> gshift] * xs[c / XB], acc0);
  }
  return hsum(_mm256_add_ps(acc0, acc1)) - 8.0f * dot_groups(d, gsum, in >> gshift);
}

float dense_dot_asym_avx2(const uint8_t* dense, const uint8_t* kept, const float* d, const float* m, int gshift,
                          const int8_t* xq, const float* xs, int64_t in) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (int64_t c = 0; c < in; c += XB) {
    const float sb = xs[c / XB];
    const int64_t G = c >> gshift;
    acc0 = fma_block(dot32_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dense + c)), xq + c), d[G] * sb,
                     acc0);
    acc1 = fma_block(dot32_avx2(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(kept + c)), xq + c), m[G] * sb,
                     acc1);
  }
  return hsum(_mm256_add_ps(acc0, acc1));
}

// ---- AVX-512 row dots ---------------------------------------------------------------------------------

#define SPARSELAND_Q512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512vbmi2,popcnt,bmi2")))

// 64 mask bits of columns [c, c + 64) (only 32 if the row ends at c + 32).
inline uint64_t mask64(const uint8_t* mrow, int64_t c, int64_t in) {
  if (in - c >= 64) {
    uint64_t k;
    std::memcpy(&k, mrow + c / 8, 8);
    return k;
  }
  uint32_t k;
  std::memcpy(&k, mrow + c / 8, 4);
  return k;
}

// One 64-column step whose codes are one byte per column (cv) and, asymmetric, whose kept columns are 1 in kv:
// returns acc + the step's lanes (d Q + m S) * s; lanes 0-7 are x block c/32, lanes 8-15 block c/32 + 1.
// G32: group of 32 columns (lanes 0-7 and 8-15 have their own d, m), else one d, m broadcast.
// SYM (m = -8 d): pruned columns hold code 8 instead of 0, so the step is d Q over all 64 columns and the
// offset term, -8 sum_G d_G S_G with S_G the x sum of group G, is the same for every row (the caller
// subtracts it once per row): no second dot product for sum_kept xq, and kv is not read.
template <bool G32, bool SYM>
SPARSELAND_Q512 inline __m512 step64(__m512i cv, __m512i kv, const float* d, const float* m, const int8_t* xq,
                                     const float* l64, int64_t c, int gshift, __m512 acc) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i half = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  const __m512i xv = _mm512_loadu_si512(xq + c);
  const __m512i q = _mm512_dpbusd_epi32(zero, cv, xv);
  const __m512 dl = G32 ? _mm512_permutexvar_ps(half, _mm512_loadu_ps(d + c / 32)) : _mm512_set1_ps(d[c >> gshift]);
  const __m512 sl = _mm512_loadu_ps(l64 + 16 * (c / 64));
  if constexpr (SYM) return _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(q), sl), dl, acc);
  const __m512i s = _mm512_dpbusd_epi32(zero, kv, xv);
  const __m512 ml = G32 ? _mm512_permutexvar_ps(half, _mm512_loadu_ps(m + c / 32)) : _mm512_set1_ps(m[c >> gshift]);
  return _mm512_fmadd_ps(_mm512_fmadd_ps(_mm512_cvtepi32_ps(q), dl, _mm512_mul_ps(_mm512_cvtepi32_ps(s), ml)), sl, acc);
}

// step64 by expansion: codes[pos..] (count popcount(k)) scattered to their columns (SYM: code 8 elsewhere).
template <bool G32, bool SYM>
SPARSELAND_Q512 inline __m512 step64_expand(uint64_t k, const uint8_t* cu, const float* d, const float* m,
                                            const int8_t* xq, const float* l64, int64_t c, int gshift, __m512 acc) {
  const __m512i raw = _mm512_loadu_si512(cu);
  const __m512i cv = SYM ? _mm512_mask_expand_epi8(_mm512_set1_epi8(8), k, raw) : _mm512_maskz_expand_epi8(k, raw);
  const __m512i kv = SYM ? _mm512_setzero_si512() : _mm512_maskz_mov_epi8(k, _mm512_set1_epi8(1));
  return step64<G32, SYM>(cv, kv, d, m, xq, l64, c, gshift, acc);
}

// Lane -> group index relative to the step's first group, for lanes covering columns off(l).
SPARSELAND_Q512 inline __m512i lane_groups(__m512i col_off, int gshift) {
  return _mm512_srlv_epi32(col_off, _mm512_set1_epi32(gshift));
}

// gsum (SYM only): the x sums of the row's groups, S_G (group_sums).
template <bool G32, bool SYM>
SPARSELAND_Q512 float row_dot_bitmask512(const uint8_t* mrow, const uint8_t* cu, const float* d, const float* m,
                                         int gshift, const int8_t* xq, const float* xs, int64_t in, const float* gsum) {
  const float* l64 = lanes64(xs, in);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t pos = 0, c = 0;
  for (; c + 128 <= in; c += 128) {  // two independent steps per iteration
    uint64_t k0, k1;
    std::memcpy(&k0, mrow + c / 8, 8);
    std::memcpy(&k1, mrow + c / 8 + 8, 8);
    const int64_t p1 = pos + _mm_popcnt_u64(k0);
    acc0 = step64_expand<G32, SYM>(k0, cu + pos, d, m, xq, l64, c, gshift, acc0);
    acc1 = step64_expand<G32, SYM>(k1, cu + p1, d, m, xq, l64, c + 64, gshift, acc1);
    pos = p1 + _mm_popcnt_u64(k1);
  }
  for (; c < in; c += 64) {
    const uint64_t k = mask64(mrow, c, in);
    acc0 = step64_expand<G32, SYM>(k, cu + pos, d, m, xq, l64, c, gshift, acc0);
    pos += _mm_popcnt_u64(k);
  }
  const float r = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
  return SYM ? r - 8.0f * dot_groups(d, gsum, in >> gshift) : r;
}

// prow: the row's packed codes (full 64-code chunks are unpacked here, in registers); cu: unpacked codes,
// only the last partial chunk (codes from (in / 128) * 64 on) is read from it. SYM (m = -8 d): the offset
// term joins the integer dot, d (Q - 8 S), one conversion per step; gsum is unused (the kept set is per row).
template <bool SYM>
SPARSELAND_Q512 float row_dot_nm512(const uint8_t* mrow, const uint8_t* prow, const uint8_t* cu, const float* d,
                                    const float* m, int gshift, const int8_t* xq, const float* xs, int64_t in) {
  const __m256i lo4 = _mm256_set1_epi8(0x0F);
  const __m512i zero = _mm512_setzero_si512(), ones = _mm512_set1_epi8(1);
  const __m512i col8 = _mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96, 104, 112, 120);
  const float* l128 = lanes128(xs, in);
  const __m512i gidx4 = lane_groups(col8, gshift);  // lane l -> group (8 l) >> gshift
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 128 <= in; c += 128) {
    uint64_t k0, k1;
    std::memcpy(&k0, mrow + c / 8, 8);
    std::memcpy(&k1, mrow + c / 8 + 8, 8);
    const __m256i pv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(prow + c / 4));  // a full chunk
    const __m512i cv = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(pv, lo4)),  // 64 kept codes
                                          _mm256_and_si256(_mm256_srli_epi16(pv, 4), lo4), 1);
    const __m256i xa = _mm512_castsi512_si256(_mm512_maskz_compress_epi8(k0, _mm512_loadu_si512(xq + c)));
    const __m256i xb = _mm512_castsi512_si256(_mm512_maskz_compress_epi8(k1, _mm512_loadu_si512(xq + c + 64)));
    const __m512i xc = _mm512_inserti64x4(_mm512_castsi256_si512(xa), xb, 1);
    const __m512i q = _mm512_dpbusd_epi32(zero, cv, xc);
    const __m512i s = _mm512_dpbusd_epi32(zero, ones, xc);
    const __m512 dl = _mm512_permutexvar_ps(gidx4, _mm512_loadu_ps(d + (c >> gshift)));
    const __m512 sl = _mm512_loadu_ps(l128 + 16 * (c / 128));
    __m512 t;
    if constexpr (SYM) {
      t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(q, _mm512_slli_epi32(s, 3))), dl);
    } else {
      const __m512 ml = _mm512_permutexvar_ps(gidx4, _mm512_loadu_ps(m + (c >> gshift)));
      t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), dl, _mm512_mul_ps(_mm512_cvtepi32_ps(s), ml));
    }
    if ((c / 128) & 1) acc1 = _mm512_fmadd_ps(t, sl, acc1);
    else acc0 = _mm512_fmadd_ps(t, sl, acc0);
  }
  // the last 32, 64 or 96 columns: expansion steps (4 kept per mask byte: codes from c / 2)
  const float* l64 = lanes64(xs, in);
  for (; c < in; c += 64)
    acc0 = gshift == 5 ? step64_expand<true, false>(mask64(mrow, c, in), cu + c / 2, d, m, xq, l64, c, 5, acc0)
                       : step64_expand<false, false>(mask64(mrow, c, in), cu + c / 2, d, m, xq, l64, c, gshift, acc0);
  return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

// unpack_codes with 64-byte loads: two full 64-code chunks (128 codes) per step, then a chunk at a time with
// masked loads (same result, same bytes read and written).
SPARSELAND_Q512 void unpack_codes512(const uint8_t* src, int64_t n, uint8_t* dst) {
  const __m512i lo4 = _mm512_set1_epi8(0x0F);
  const __m512i first = _mm512_setr_epi64(0, 1, 2, 3, 8, 9, 10, 11), second = _mm512_setr_epi64(4, 5, 6, 7, 12, 13, 14, 15);
  int64_t i = 0;
  for (; i + 128 <= n; i += 128) {
    const __m512i v = _mm512_loadu_si512(src + i / 2);
    const __m512i lo = _mm512_and_si512(v, lo4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), lo4);
    _mm512_storeu_si512(dst + i, _mm512_permutex2var_epi64(lo, first, hi));
    _mm512_storeu_si512(dst + i + 64, _mm512_permutex2var_epi64(lo, second, hi));
  }
  const __m256i lo4y = _mm256_set1_epi8(0x0F);
  for (; i < n; i += 64) {  // the rest, a chunk at a time (a masked load for the short last one)
    const int64_t cnt = std::min<int64_t>(64, n - i), h = (cnt + 1) / 2;
    const __m256i v = _mm256_maskz_loadu_epi8(_bzhi_u32(~0u, static_cast<unsigned>(h)), src + i / 2);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_and_si256(v, lo4y));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i + h), _mm256_and_si256(_mm256_srli_epi16(v, 4), lo4y));
  }
}

// convert_scales with masked loads instead of a scalar tail.
SPARSELAND_Q512 void convert_scales512(const at::Half* scale, const at::Half* offset, int64_t G, float* d, float* m) {
  for (int64_t g = 0; g < G; g += 16) {
    const __mmask16 k = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<unsigned>(std::min<int64_t>(16, G - g))));
    const __m512 dv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, scale + g));
    _mm512_storeu_ps(d + g, dv);
    _mm512_storeu_ps(m + g, offset ? _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, offset + g))
                                   : _mm512_mul_ps(dv, _mm512_set1_ps(-8.0f)));
  }
}

// Several vectors (prefill), AVX-512: a row expanded once to one code byte per column (the fill, 8 if SYM, in
// pruned columns; asymmetric: also a kept byte per column), then each vector takes one vpdpbusd per 64 columns
// (two if asymmetric) with no expansion. codes: the row's kept codes unpacked; dense / kept: in + 64 bytes.
template <bool SYM>
SPARSELAND_Q512 void expand_row512(const uint8_t* mrow, const uint8_t* cu, int64_t in, uint8_t* dense, uint8_t* kept) {
  int64_t pos = 0;
  for (int64_t c = 0; c < in; c += 64) {
    const uint64_t k = mask64(mrow, c, in);
    const __m512i raw = _mm512_loadu_si512(cu + pos);
    _mm512_storeu_si512(dense + c, SYM ? _mm512_mask_expand_epi8(_mm512_set1_epi8(8), k, raw)
                                       : _mm512_maskz_expand_epi8(k, raw));
    if (!SYM) _mm512_storeu_si512(kept + c, _mm512_maskz_mov_epi8(k, _mm512_set1_epi8(1)));
    pos += _mm_popcnt_u64(k);
  }
}

template <bool G32, bool SYM>
SPARSELAND_Q512 float dense_dot512(const uint8_t* dense, const uint8_t* kept, const float* d, const float* m, int gshift,
                                   const int8_t* xq, const float* xs, int64_t in, const float* gsum) {
  const float* l64 = lanes64(xs, in);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t c = 0; c < in; c += 64)  // past `in`: fill or 0 codes against zero x padding
    acc = step64<G32, SYM>(_mm512_loadu_si512(dense + c), SYM ? _mm512_setzero_si512() : _mm512_loadu_si512(kept + c),
                           d, m, xq, l64, c, gshift, acc);
  const float r = _mm512_reduce_add_ps(acc);
  return SYM ? r - 8.0f * dot_groups(d, gsum, in >> gshift) : r;
}

inline float dense_dot512(bool sym, const Scratch& S, int gs, const int8_t* xq, const float* xs, int64_t in,
                          const float* gsum) {
  const uint8_t *dn = S.dense.data(), *kp = S.kept.data();
  const float *d = S.d.data(), *m = S.m.data();
  if (gs == 5) return sym ? dense_dot512<true, true>(dn, kp, d, m, gs, xq, xs, in, gsum)
                          : dense_dot512<true, false>(dn, kp, d, m, gs, xq, xs, in, gsum);
  return sym ? dense_dot512<false, true>(dn, kp, d, m, gs, xq, xs, in, gsum)
             : dense_dot512<false, false>(dn, kp, d, m, gs, xq, xs, in, gsum);
}

// One row of either format on the AVX-512 path; sym: the symmetric kernels (fill / joined offset).
inline float row_dot512(bool nm, bool sym, const uint8_t* mrow, const uint8_t* prow, const Scratch& S, int gs,
                        const int8_t* xq, const float* xs, int64_t in, const float* gsum) {
  const uint8_t* cu = S.codes.data();
  const float *d = S.d.data(), *m = S.m.data();
  if (nm) return sym ? row_dot_nm512<true>(mrow, prow, cu, d, m, gs, xq, xs, in)
                     : row_dot_nm512<false>(mrow, prow, cu, d, m, gs, xq, xs, in);
  if (gs == 5) return sym ? row_dot_bitmask512<true, true>(mrow, cu, d, m, gs, xq, xs, in, gsum)
                          : row_dot_bitmask512<true, false>(mrow, cu, d, m, gs, xq, xs, in, gsum);
  return sym ? row_dot_bitmask512<false, true>(mrow, cu, d, m, gs, xq, xs, in, gsum)
             : row_dot_bitmask512<false, false>(mrow, cu, d, m, gs, xq, xs, in, gsum);
}

// ---- row loops ----------------------------------------------------------------------------------------

inline int group_shift(int64_t group) { return group == 32 ? 5 : (group == 64 ? 6 : 7); }

// Quantized x vectors: xq (B, xq_stride) int8 and xs (B, xs_stride) fp32.
struct XQ {
  const int8_t* q;
  const float* s;
  int64_t q_stride, s_stride;
};

// y[b * y_stride + r] for rows [r0, r1) and the B quantized vectors. row_ptr == nullptr: N:M (row r's
// in / 2 codes at codes + r * in / 4). Returns false if a bitmask row's byte count disagrees with its
// mask (that row is skipped and set to NaN).
bool rows(const uint8_t* mask, const int64_t* row_ptr, const uint8_t* codes, const at::Half* scale,
          const at::Half* offset, const XQ& X, int64_t B, float* y, int64_t y_stride, int64_t in, int64_t group,
          int64_t r0, int64_t r1) {
  const int64_t in8 = in / 8, G = in / group;
  const int gs = group_shift(group);
  const bool nm = row_ptr == nullptr;
  const int isa = quant_isa();
  Scratch& S = scratch(in);
  bool ok = true;
  // Unless qsparse_set_fill_kernels(false): symmetric schemes take the fill kernels; with several vectors
  // every row is expanded once (expand_row_avx2 / expand_row512) and dotted with each vector.
  const bool on = g_fill_kernels.load(std::memory_order_relaxed), sym = offset == nullptr;
  const bool fill = on && sym, expand_once = on && B > 1;
  if (fill) {  // per vector: S_G for the offset term
    const int64_t gstride = G + 8;
    if ((int64_t)S.gsum.size() < B * gstride) S.gsum.assign(B * gstride, 0.0f);
    for (int64_t b = 0; b < B; ++b) group_sums(X.s + b * X.s_stride, in, gs, S.gsum.data() + b * gstride);
  }
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* mrow = mask + r * in8;
    const uint8_t* prow = nm ? codes + r * (in / 4) : nullptr;
    if (nm && isa == kAvx512 && expand_once) {
      unpack_codes512(prow, in / 2, S.codes.data());
    } else if (nm && isa == kAvx512) {  // full chunks are unpacked in registers; only the partial last one here
      const int64_t full = in / 128;
      unpack_codes512(prow + 32 * full, (in % 128) / 2, S.codes.data() + 64 * full);
    } else if (nm) {
      unpack_codes(prow, in / 2, S.codes.data());
    } else {
      const int64_t n = bitmask_row_codes(mrow, row_ptr, r, in8);
      if (n < 0) {
        ok = false;
        for (int64_t b = 0; b < B; ++b) y[b * y_stride + r] = std::numeric_limits<float>::quiet_NaN();
        continue;
      }
      if (isa == kAvx512) unpack_codes512(codes + row_ptr[r], n, S.codes.data());
      else unpack_codes(codes + row_ptr[r], n, S.codes.data());
    }
    if (isa == kAvx512) convert_scales512(scale + r * G, offset ? offset + r * G : nullptr, G, S.d.data(), S.m.data());
    else convert_scales(scale + r * G, offset ? offset + r * G : nullptr, G, S.d.data(), S.m.data());
    if (expand_once && isa == kAvx512 && sym) expand_row512<true>(mrow, S.codes.data(), in, S.dense.data(), S.kept.data());
    else if (expand_once && isa == kAvx512) expand_row512<false>(mrow, S.codes.data(), in, S.dense.data(), S.kept.data());
    else if (expand_once && nm) expand_row_avx2<true>(mrow, S.codes.data(), in, sym, S.dense.data(), S.kept.data());
    else if (expand_once) expand_row_avx2<false>(mrow, S.codes.data(), in, sym, S.dense.data(), S.kept.data());
    for (int64_t b = 0; b < B; ++b) {
      const int8_t* xq = X.q + b * X.q_stride;
      const float* xs = X.s + b * X.s_stride;
      const float* gsum = fill ? S.gsum.data() + b * (G + 8) : nullptr;
      float v;
      if (expand_once && isa == kAvx512)
        v = dense_dot512(sym, S, gs, xq, xs, in, gsum);
      else if (expand_once && sym)
        v = dense_dot_sym_avx2(S.dense.data(), S.d.data(), gs, xq, xs, in, gsum);
      else if (expand_once)
        v = dense_dot_asym_avx2(S.dense.data(), S.kept.data(), S.d.data(), S.m.data(), gs, xq, xs, in);
      else if (fill && isa == kAvx2)
        v = nm ? row_dot_sym_avx2<true>(mrow, S.codes.data(), S.d.data(), gs, xq, xs, in, gsum)
               : row_dot_sym_avx2<false>(mrow, S.codes.data(), S.d.data(), gs, xq, xs, in, gsum);
      else if (isa == kAvx512)
        v = row_dot512(nm, sym && on, mrow, prow, S, gs, xq, xs, in, gsum);
      else
        v = row_dot_avx2(mrow, S.codes.data(), S.d.data(), S.m.data(), gs, xq, xs, in);
      y[b * y_stride + r] = v;
    }
  }
  return ok;
}

// Quantize the calling thread's copy of one x into its scratch (single-vector entry points).
XQ quantize_one(const float* x, int64_t in) {
  Scratch& S = scratch(in);
  quantize_x(x, in, S.xq.data(), S.xs.data());
  return XQ{S.xq.data(), S.xs.data(), 0, 0};
}

// ---- checks and ops -------------------------------------------------------------------------------------

struct Shape {
  int64_t out, in, group;
};

Shape check_common(const at::Tensor& mask, const at::Tensor& scale, const std::optional<at::Tensor>& offset,
                   const at::Tensor& x) {
  TORCH_CHECK(mask.dim() == 2 && mask.scalar_type() == at::kByte && mask.is_contiguous(),
              "mask must be a contiguous uint8 (out, in/8) tensor");
  const int64_t out = mask.size(0), in = mask.size(1) * 8;
  TORCH_CHECK(in > 0 && in % XB == 0, "in (= 8 * mask.size(1) = ", in, ") must be a positive multiple of 32");
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.size(0) == out &&
                  scale.size(1) > 0 && in % scale.size(1) == 0,
              "scale must be a contiguous float16 (out, G) tensor with in % G == 0");
  const int64_t group = in / scale.size(1);
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "group size ", group, " is not supported (32, 64, 128)");
  if (offset.has_value()) {
    const at::Tensor& o = *offset;
    TORCH_CHECK(o.scalar_type() == at::kHalf && o.is_contiguous() && o.sizes() == scale.sizes(),
                "offset must be a contiguous float16 tensor shaped like scale");
  }
  check_x(x, in);
  return {out, in, group};
}

// Quantize all B rows of x; parallel over the rows of W afterwards.
struct XBuf {
  std::vector<int8_t> q;
  std::vector<float> s;
  XQ view;
  XBuf(const at::Tensor& x, int64_t in) {
    const int64_t B = x.size(0), qs = in + XPAD, ss = xs_len(in);
    q.assign(B * qs + XPAD, 0);
    s.assign(B * ss + XPAD, 0.0f);
    const float* X = x.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) quantize_x(X + b * in, in, q.data() + b * qs, s.data() + b * ss);
    view = XQ{q.data(), s.data(), qs, ss};
  }
};

// Rows per parallel chunk; vectors per pass (each pass unpacks a row once and dots it with this many x).
constexpr int64_t kGrain = 16, kBatch = 8;

// Symmetric weights with many vectors (prefill): the whole weight as a dense Q4 weight (pruned columns get
// code 8, value d (8 - 8) = 0; llama.cpp's block order, qmatvec.h), then the dense kernel's multi-vector
// tiles, which unpack each weight block once for 8 vectors (AVX-512) where the sparse rows cannot.
constexpr int64_t kDenseB = 8;
constexpr const char* kBadRowMessage =
    "q4bitmask: a row's code byte count (row_ptr[r+1] - row_ptr[r]) is not ceil(popcount/2)";

// ok: false if a bitmask row's byte count disagrees with its mask (that row is left unread, as in rows()).
at::Tensor sym_as_dense_q4(const uint8_t* M, const int64_t* R, const uint8_t* C, const Shape& sh, std::atomic<bool>& ok) {
  auto dense = at::empty({sh.out, sh.in / 2}, at::kByte);
  uint8_t* D = dense.data_ptr<uint8_t>();
  const int isa = quant_isa();
  parallel_rows(sh.out, kGrain, [&](int64_t r0, int64_t r1) {
    Scratch& S = scratch(sh.in);
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* mrow = M + r * (sh.in / 8);
      const int64_t n = R ? bitmask_row_codes(mrow, R, r, sh.in / 8) : sh.in / 2;
      if (n < 0) {
        ok = false;
        continue;
      }
      unpack_codes(R ? C + R[r] : C + r * (sh.in / 4), n, S.codes.data());
      if (isa == kAvx512) expand_row512<true>(mrow, S.codes.data(), sh.in, S.dense.data(), S.kept.data());
      else if (R) expand_row_avx2<false>(mrow, S.codes.data(), sh.in, true, S.dense.data(), S.kept.data());
      else expand_row_avx2<true>(mrow, S.codes.data(), sh.in, true, S.dense.data(), S.kept.data());
      for (int64_t k = 0; k < sh.in / XB; ++k) {  // 32 codes -> 16 bytes: low nibble j, high nibble j + 16
        const uint8_t* e = S.dense.data() + XB * k;
        const __m128i lo = _mm_loadu_si128(reinterpret_cast<const __m128i*>(e));
        const __m128i hi = _mm_loadu_si128(reinterpret_cast<const __m128i*>(e + 16));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(D + r * (sh.in / 2) + 16 * k), _mm_or_si128(lo, _mm_slli_epi16(hi, 4)));
      }
    }
  });
  return dense;
}

at::Tensor run_mm(const uint8_t* M, const int64_t* R, const uint8_t* C, const at::Tensor& scale,
                  const std::optional<at::Tensor>& offset, const at::Tensor& x, const Shape& sh) {
  const int64_t B = x.size(0);
  std::atomic<bool> ok{true};
  if (!offset.has_value() && B >= kDenseB && g_fill_kernels.load(std::memory_order_relaxed)) {
    at::Tensor dense = sym_as_dense_q4(M, R, C, sh, ok);
    TORCH_CHECK(ok.load(), kBadRowMessage);
    return q4_mm(dense, scale, std::nullopt, sh.group, x);
  }
  auto y = at::empty({B, sh.out}, x.options());
  if (B == 0 || sh.out == 0) return y;
  XBuf X(x, sh.in);
  const at::Half* D = scale.data_ptr<at::Half>();
  const at::Half* O = offset.has_value() ? offset->data_ptr<at::Half>() : nullptr;
  float* Y = y.data_ptr<float>();
  for (int64_t b0 = 0; b0 < B; b0 += kBatch) {
    const int64_t nb = std::min(kBatch, B - b0);
    XQ xv{X.view.q + b0 * X.view.q_stride, X.view.s + b0 * X.view.s_stride, X.view.q_stride, X.view.s_stride};
    parallel_rows(sh.out, kGrain, [&](int64_t r0, int64_t r1) {
      if (!rows(M, R, C, D, O, xv, nb, Y + b0 * sh.out, sh.out, sh.in, sh.group, r0, r1)) ok = false;
    });
  }
  TORCH_CHECK(ok.load(), kBadRowMessage);
  return y;
}

}  // namespace

// ---- single-vector entry points (qsparse.h) ---------------------------------------------------------------

void q4nm_mv(const uint8_t* mask, const uint8_t* codes, const at::Half* scale, const at::Half* offset, const float* x,
             float* y, int64_t in, int64_t group, int64_t r0, int64_t r1) {
  const XQ X = quantize_one(x, in);
  rows(mask, nullptr, codes, scale, offset, X, 1, y, 0, in, group, r0, r1);
}

bool q4bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const uint8_t* codes, const at::Half* scale,
                  const at::Half* offset, const float* x, float* y, int64_t in, int64_t group, int64_t r0, int64_t r1) {
  const XQ X = quantize_one(x, in);
  return rows(mask, row_ptr, codes, scale, offset, X, 1, y, 0, in, group, r0, r1);
}

// ---- torch ops ------------------------------------------------------------------------------------------

// x (B, in) fp32 -> (B, out) fp32 for a q4nm weight: mask (out, in/8) uint8 (4 bits per byte),
// codes (out, in/4) uint8, scale / offset (out, in/group) float16 (offset None: symmetric).
at::Tensor q4nm_mm(at::Tensor mask, at::Tensor codes, at::Tensor scale, std::optional<at::Tensor> offset, at::Tensor x) {
  const Shape sh = check_common(mask, scale, offset, x);
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
                  codes.size(0) == sh.out && codes.size(1) == sh.in / 4,
              "codes must be a contiguous uint8 (out, in/4) tensor");
  return run_mm(mask.data_ptr<uint8_t>(), nullptr, codes.data_ptr<uint8_t>(), scale, offset, x, sh);
}

// x (B, in) fp32 -> (B, out) fp32 for a q4bitmask weight: mask (out, in/8) uint8, row_ptr (out+1,) int64
// byte offsets into codes (1-D uint8), scale / offset (out, in/group) float16.
at::Tensor q4bitmask_mm(at::Tensor mask, at::Tensor row_ptr, at::Tensor codes, at::Tensor scale,
                        std::optional<at::Tensor> offset, at::Tensor x) {
  const Shape sh = check_common(mask, scale, offset, x);
  TORCH_CHECK(codes.dim() == 1 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "codes must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(row_ptr.dim() == 1 && row_ptr.scalar_type() == at::kLong && row_ptr.is_contiguous() &&
                  row_ptr.numel() == sh.out + 1,
              "row_ptr must be a contiguous int64 (out+1,) tensor");
  const int64_t* R = row_ptr.data_ptr<int64_t>();
  TORCH_CHECK(R[0] >= 0, "row_ptr[0] must be >= 0");
  for (int64_t r = 0; r < sh.out; ++r)
    TORCH_CHECK(R[r + 1] >= R[r] && R[r + 1] - R[r] <= sh.in / 2, "row_ptr must be nondecreasing by at most in/2");
  TORCH_CHECK(R[sh.out] <= codes.numel(), "row_ptr[out] = ", R[sh.out], " is past the ", codes.numel(), " code bytes");
  return run_mm(mask.data_ptr<uint8_t>(), R, codes.data_ptr<uint8_t>(), scale, offset, x, sh);
}

// "auto" (CPU features, or SPARSELAND_QUANT_ISA=avx2), "avx2" or "avx512"; returns the path in use before.
std::string qsparse_set_isa(std::string isa) {
  const std::string prev = quant_isa() == kAvx512 ? "avx512" : "avx2";
  if (isa == "auto") {
    g_isa.store(-1);
  } else if (isa == "avx2") {
    g_isa.store(kAvx2);
  } else if (isa == "avx512") {
    TORCH_CHECK(cpu_has_avx512(), "this CPU lacks AVX-512 F/BW/VL/VNNI/VBMI2");
    g_isa.store(kAvx512);
  } else {
    TORCH_CHECK(false, "isa must be auto, avx2 or avx512, not ", isa);
  }
  return prev;
}

std::string qsparse_isa() { return quant_isa() == kAvx512 ? "avx512" : "avx2"; }

// Turn the symmetric (fill) and AVX2 expand-once kernels on or off (benchmarks only); returns the previous setting.
bool qsparse_set_fill_kernels(bool on) { return g_fill_kernels.exchange(on); }

}  // namespace sparseland

TORCH_LIBRARY_FRAGMENT(sparseland, m) {
  m.def("q4nm_mm(Tensor mask, Tensor codes, Tensor scale, Tensor? offset, Tensor x) -> Tensor", &sparseland::q4nm_mm);
  m.def("q4bitmask_mm(Tensor mask, Tensor row_ptr, Tensor codes, Tensor scale, Tensor? offset, Tensor x) -> Tensor",
        &sparseland::q4bitmask_mm);
  m.def("qsparse_set_isa(str isa) -> str", &sparseland::qsparse_set_isa);
  m.def("qsparse_isa() -> str", &sparseland::qsparse_isa);
  m.def("qsparse_set_fill_kernels(bool on) -> bool", &sparseland::qsparse_set_fill_kernels);
}
