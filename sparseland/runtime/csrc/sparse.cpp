// Sparse-weight matmuls, Y (B, out) = X (B, in) @ W^T, fp32 accumulate, values fp32 or bf16.
//
// bitmask: mask (out, ceil(in/8)) uint8, bit j of byte k = W[r, 8k+j] != 0; values packed row after
//   row (row r starts at row_ptr[r]), padded with 8 trailing zeros. Per mask byte: load 8 packed
//   values, "expand" them into their lanes with one permute + and, FMA with 8 contiguous x.
//   One vector (B == 1, the decode case) on a CPU with AVX-512 VPOPCNTDQ (Zen 4, Ice Lake and later)
//   takes 16 lanes per 2 mask bytes instead: the lane indices are computed in registers (lane j of a
//   16-bit word w reads value popcount(w & (2^j - 1)), one vpopcntd) rather than loaded from the
//   table, a zero-masked vpermps (the word itself is the mask) expands the values, and the four
//   words of each 8 mask bytes have their value offsets computed ahead, so one row is a single
//   sequential pass over its mask and values with four independent FMA chains. AVX-512 code is
//   compiled per function (target attribute) and chosen at run time; the build stays -march=haswell.
//   SPARSELAND_BITMASK_ISA=avx2 forces the table path (for tests and comparisons).
// nm (4 kept per byte: 2:4, 4:8): same mask, but every byte has exactly 4 bits set, so row r's values
//   start at r * ceil(in/8) * 4. Per pair of bytes: "compress" the 16 x values to the 8 kept ones
//   with two permutes, one FMA with 8 contiguous values; no popcount chain, no masking.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "common.h"
#include "matvec.h"
#include "sparse_checks.h"

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

// ---- single vector, AVX-512 (run-time dispatch) ----
#define SPARSELAND_AVX512 __attribute__((target("avx512f,avx512vl,avx512bw,avx512vpopcntdq,popcnt,bmi2")))

// 16 values at p -> 16 fp32 lanes; Full == false loads only the first n (the rest read as 0, no
// access past them), for rows near the end of the values array.
template <bool Full>
SPARSELAND_AVX512 inline __m512 load16(const float* p, unsigned n) {
  if (Full) return _mm512_loadu_ps(p);
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, n)), p);
}
template <bool Full>
SPARSELAND_AVX512 inline __m512 load16(const at::BFloat16* p, unsigned n) {
  __m256i h = Full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))
                   : _mm256_maskz_loadu_epi16(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, n)), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// One row: sum_j W[r, j] x[j] from its mask bytes m[0, in8) and packed values v.
template <typename T, bool Full>
SPARSELAND_AVX512 inline float bitmask_row512(const uint8_t* m, const T* v, const float* x, int64_t in8) {
  // Lane j of word w reads packed value popcount(w & below_j): its rank among the set bits.
  const __m512i blo = _mm512_setr_epi32(0, 1, 3, 7, 15, 31, 63, 127, 255, 511, 1023, 2047, 4095, 8191, 16383, 32767);
  const __m512i bhi = _mm512_slli_epi32(blo, 16);  // the same for the upper word of a 32-bit pair
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t n8 = in8 & ~int64_t(7);
  int64_t k = 0;
  for (; k < n8; k += 8) {
    uint64_t w;
    std::memcpy(&w, m + k, 8);
    const uint32_t wl = static_cast<uint32_t>(w), wh = static_cast<uint32_t>(w >> 32);
    const unsigned c0 = _mm_popcnt_u32(wl & 0xFFFF), c1 = _mm_popcnt_u32(wl >> 16);
    const unsigned c2 = _mm_popcnt_u32(wh & 0xFFFF), c3 = _mm_popcnt_u32(wh >> 16);
    const T *v1 = v + c0, *v2 = v1 + c1, *v3 = v2 + c2;
    const __m512i bl = _mm512_set1_epi32(static_cast<int>(wl)), bh = _mm512_set1_epi32(static_cast<int>(wh));
    const __m512i i0 = _mm512_popcnt_epi32(_mm512_and_si512(bl, blo));
    const __m512i i1 = _mm512_popcnt_epi32(_mm512_and_si512(bl, bhi));
    const __m512i i2 = _mm512_popcnt_epi32(_mm512_and_si512(bh, blo));
    const __m512i i3 = _mm512_popcnt_epi32(_mm512_and_si512(bh, bhi));
    a0 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(static_cast<__mmask16>(wl), i0, load16<Full>(v, c0)),
                         _mm512_loadu_ps(x + 8 * k), a0);
    a1 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(static_cast<__mmask16>(wl >> 16), i1, load16<Full>(v1, c1)),
                         _mm512_loadu_ps(x + 8 * k + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(static_cast<__mmask16>(wh), i2, load16<Full>(v2, c2)),
                         _mm512_loadu_ps(x + 8 * k + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(static_cast<__mmask16>(wh >> 16), i3, load16<Full>(v3, c3)),
                         _mm512_loadu_ps(x + 8 * k + 48), a3);
    v = v3 + c3;
  }
  for (; k < in8; ++k) {  // the last in8 % 8 bytes, 8 lanes each
    const unsigned b = m[k], c = _mm_popcnt_u32(b);
    const __m512i i0 = _mm512_popcnt_epi32(_mm512_and_si512(_mm512_set1_epi32(static_cast<int>(b)), blo));
    a0 = _mm512_fmadd_ps(_mm512_maskz_permutexvar_ps(static_cast<__mmask16>(b), i0, load16<Full>(v, c)),
                         _mm512_maskz_loadu_ps(0xFF, x + 8 * k), a0);
    v += c;
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <typename T>
SPARSELAND_AVX512 static void bitmask_mv512(const uint8_t* mask, const int64_t* row_ptr, const T* vals, const float* x,
                                            float* y, int64_t in8, int64_t r0, int64_t r1) {
  // Full 16-value loads read up to 16 values past a row's start; values are known to exist up to
  // row_ptr[r1] + 8 (the 8 padding zeros), so rows ending within 8 of that use exact masked loads.
  const int64_t safe_end = row_ptr[r1] - 8;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* m = mask + r * in8;
    const T* v = vals + row_ptr[r];
    y[r] = row_ptr[r + 1] <= safe_end ? bitmask_row512<T, true>(m, v, x, in8) : bitmask_row512<T, false>(m, v, x, in8);
  }
}

// ---- single vector, bf16 values, AVX-512 VBMI2 (run-time dispatch) ----
// 32 weights per 32-bit mask word w: one vpexpandw (zero-masked by w) puts the word's packed bf16 values
// in their 16-bit lanes. Read as 16 dwords, lane i holds weight 2i in its low half and weight 2i+1 in
// its high half, so both become exact fp32 with one op each (shift left 16; and 0xFFFF0000) - no
// widening shuffles - and are FMA'd with x deinterleaved once per call (per 32 inputs: the 16 even
// ones, then the 16 odd ones). N:M (4 kept per byte) is the same loop with 16 values per word and no
// popcount. Values are read with masked loads of exactly the word's count (nothing past the row).
#define SPARSELAND_AVX512_VBMI2 __attribute__((target("avx512f,avx512vl,avx512bw,avx512vbmi2,popcnt,bmi2")))

// x (n = in8 * 8 floats) -> xd (n rounded up to 32): per 32 inputs the even ones then the odd ones, zeros past n.
SPARSELAND_AVX512_VBMI2 static void deinterleave32(const float* x, float* xd, int64_t n) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_add_epi32(ev, _mm512_set1_epi32(1));
  for (int64_t c = 0; c < n; c += 32) {
    const int64_t rem = n - c;
    __m512 a, b;
    if (rem >= 32) {
      a = _mm512_loadu_ps(x + c), b = _mm512_loadu_ps(x + c + 16);
    } else {
      a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<unsigned>(rem))), x + c);
      b = rem > 16 ? _mm512_maskz_loadu_ps(static_cast<__mmask16>(_bzhi_u32(0xFFFFu, static_cast<unsigned>(rem - 16))),
                                           x + c + 16)
                   : _mm512_setzero_ps();
    }
    _mm512_storeu_ps(xd + c, _mm512_permutex2var_ps(a, ev, b));
    _mm512_storeu_ps(xd + c + 16, _mm512_permutex2var_ps(a, od, b));
  }
}

// One 32-bit mask word: its c packed values at p, expanded and FMA'd with deinterleaved x at xp.
SPARSELAND_AVX512_VBMI2 inline void step_bf16(uint32_t w, unsigned c, const uint16_t* p, const float* xp, __m512& ae,
                                              __m512& ao) {
  const __m512i hi = _mm512_set1_epi32(static_cast<int>(0xFFFF0000u));
  const __m512i e = _mm512_maskz_expand_epi16(w, _mm512_maskz_loadu_epi16(_bzhi_u32(0xFFFFFFFFu, c), p));
  ae = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(e, 16)), _mm512_loadu_ps(xp), ae);
  ao = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(e, hi)), _mm512_loadu_ps(xp + 16), ao);
}

// sum_j W[r, j] x[j] for one row: mask bytes m[0, in8), packed bf16 values v, deinterleaved x.
template <bool NM>
SPARSELAND_AVX512_VBMI2 inline float row_bf16_512(const uint8_t* m, const uint16_t* v, const float* xd, int64_t in8) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  const int64_t n8 = in8 & ~int64_t(7);
  int64_t k = 0;
  for (; k < n8; k += 8) {  // 64 weights: two words, four FMA chains
    uint32_t w0, w1;
    std::memcpy(&w0, m + k, 4);
    std::memcpy(&w1, m + k + 4, 4);
    const unsigned c0 = NM ? 16 : _mm_popcnt_u32(w0), c1 = NM ? 16 : _mm_popcnt_u32(w1);
    step_bf16(w0, c0, v, xd + 8 * k, a0, a1);
    step_bf16(w1, c1, v + c0, xd + 8 * k + 32, a2, a3);
    v += c0 + c1;
  }
  for (; k < in8; k += 4) {  // the last in8 % 8 bytes, up to 4 per word
    const int64_t nb = std::min<int64_t>(4, in8 - k);
    uint32_t w = 0;
    std::memcpy(&w, m + k, nb);
    const unsigned c = NM ? 4 * static_cast<unsigned>(nb) : _mm_popcnt_u32(w);
    step_bf16(w, c, v, xd + 8 * k, a0, a1);
    v += c;
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <bool NM>
SPARSELAND_AVX512_VBMI2 static void mv_bf16_512(const uint8_t* mask, const int64_t* row_ptr, const at::BFloat16* vals,
                                                const float* x, float* y, int64_t in8, int64_t r0, int64_t r1) {
  const int64_t n = in8 * 8;
  // The deinterleaved x on the stack up to 4096 inputs (a thread_local buffer cost a TLS lookup per row).
  alignas(64) float buf[4096 + 32];
  std::vector<float> big(n + 32 > 4096 + 32 ? n + 32 : 0);
  float* xd = n <= 4096 ? buf : big.data();
  deinterleave32(x, xd, n);
  const uint16_t* V = reinterpret_cast<const uint16_t*>(vals);
  for (int64_t r = r0; r < r1; ++r)
    y[r] = row_bf16_512<NM>(mask + r * in8, V + (NM ? r * in8 * 4 : row_ptr[r]), xd, in8);
}

// Kernel level: 0 AVX2 tables; 1 AVX-512 VPOPCNTDQ (fp32 and bf16 bitmask, as in kernels2); 2 as 1 plus
// the VBMI2 bf16 kernels above for bitmask and N:M. The default is min(1, CPU): level 2 is opt-in
// (SPARSELAND_BITMASK_ISA=vbmi2) because inside the extension it measured 1.5-2x slower than level 1 on
// the Zen 4 dev VM, although the same loop in a standalone build runs ~2x faster than level 1 (cause not
// found yet; see benchmarks/results/bf16_kernels.md). SPARSELAND_BITMASK_ISA=avx2 forces 0, avx512 1;
// set_bitmask_isa() changes the level at run time (tests, benchmarks).
static int cpu_isa() {
  static const int isa = [] {
    __builtin_cpu_init();
    const bool l1 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vpopcntdq") &&
                    __builtin_cpu_supports("bmi2");
    return l1 ? (__builtin_cpu_supports("avx512vbmi2") ? 2 : 1) : 0;
  }();
  return isa;
}
static std::atomic<int> g_isa{-1};
static int bitmask_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = std::min(cpu_isa(), 1);
    const char* env = std::getenv("SPARSELAND_BITMASK_ISA");
    if (env != nullptr && std::strcmp(env, "avx2") == 0) isa = 0;
    if (env != nullptr && std::strcmp(env, "vbmi2") == 0) isa = cpu_isa();
    g_isa.store(isa, std::memory_order_relaxed);
  }
  return isa;
}
// level < 0: query. Otherwise use min(level, what the CPU supports); returns the level in effect before.
int64_t set_bitmask_isa(int64_t level) {
  const int old = bitmask_isa();
  if (level >= 0) g_isa.store(std::min<int>(static_cast<int>(level), cpu_isa()), std::memory_order_relaxed);
  return old;
}
int64_t cpu_bitmask_isa() { return cpu_isa(); }

// Single-vector entry points for the fused decode step (x padded to in8 * 8 floats, y[r] for r in [r0, r1)).
void bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const float* vals, const float* x, float* y, int64_t in8,
                int64_t r0, int64_t r1) {
  if (bitmask_isa() >= 1) return bitmask_mv512(mask, row_ptr, vals, x, y, in8, r0, r1);
  bitmask_rows<float, 1>(mask, row_ptr, vals, x, y, in8, in8 * 8, 0, r0, r1);
}
void bitmask_mv(const uint8_t* mask, const int64_t* row_ptr, const at::BFloat16* vals, const float* x, float* y,
                int64_t in8, int64_t r0, int64_t r1) {
  const int isa = bitmask_isa();
  if (isa >= 2) return mv_bf16_512<false>(mask, row_ptr, vals, x, y, in8, r0, r1);
  if (isa == 1) return bitmask_mv512(mask, row_ptr, vals, x, y, in8, r0, r1);
  bitmask_rows<at::BFloat16, 1>(mask, row_ptr, vals, x, y, in8, in8 * 8, 0, r0, r1);
}
void nm4_mv(const uint8_t* mask, const float* vals, const float* x, float* y, int64_t in8, int64_t r0, int64_t r1) {
  nm4_rows(mask, vals, x, y, 1, in8, in8 * 8, 0, r0, r1);
}
void nm4_mv(const uint8_t* mask, const at::BFloat16* vals, const float* x, float* y, int64_t in8, int64_t r0,
            int64_t r1) {
  if (bitmask_isa() >= 2) return mv_bf16_512<true>(mask, nullptr, vals, x, y, in8, r0, r1);
  nm4_rows(mask, vals, x, y, 1, in8, in8 * 8, 0, r0, r1);
}

at::Tensor bitmask_mm(at::Tensor mask, at::Tensor row_ptr, at::Tensor values, at::Tensor x) {
  check_mask(mask);
  check_values(values);
  const int64_t out = mask.size(0), in8 = mask.size(1), in_pad = in8 * 8, B = x.size(0);
  check_row_ptr(row_ptr, out, values.numel());  // contiguous, monotone, values padded with 8 zeros
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= in_pad && x.size(1) > in_pad - 8, "x does not match the mask width");
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
        else bitmask_mv(M, R, V, Xb, Yb, in8, r0, r1);
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
  check_mask(mask);
  check_values(values);
  const int64_t out = mask.size(0), in8 = mask.size(1), in_pad = in8 * 8, B = x.size(0);
  TORCH_CHECK(x.dim() == 2 && x.size(1) <= in_pad && x.size(1) > in_pad - 8, "x does not match the mask width");
  TORCH_CHECK(values.numel() >= out * in8 * 4 + 8, "values must hold 4 per mask byte plus 8 zeros of padding");
  auto xc = x.contiguous().to(at::kFloat);
  std::vector<float> X = padded_input(xc, in_pad);
  auto y = at::empty({B, out}, xc.options());
  const uint8_t* M = mask.data_ptr<uint8_t>();
  float* Y = y.data_ptr<float>();
  auto run = [&](auto* V) {
    parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
      if (B == 1) nm4_mv(M, V, X.data(), Y, in8, r0, r1);
      else nm4_rows(M, V, X.data(), Y, B, in8, in_pad, out, r0, r1);
    });
  };
  if (values.scalar_type() == at::kFloat) run(values.data_ptr<float>());
  else if (values.scalar_type() == at::kBFloat16) run(values.data_ptr<at::BFloat16>());
  else TORCH_CHECK(false, "values must be float32 or bfloat16");
  return y;
}

}  // namespace sparseland
