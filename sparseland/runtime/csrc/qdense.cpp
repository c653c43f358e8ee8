// Dense quantized matmuls: Y (B, out) = X (B, in) @ W^T with W in the Q4 / Q8 layouts of qmatvec.h.
//
// Math (llama.cpp's Q4_1 x Q8_1 scheme). x is quantized per block k of 32 columns:
//   dx_k = max|x_k| / 127,  xq[c] = round_half_even(x[c] * (127 / max|x_k|))  in [-127, 127]
// (0 for an all-zero block). For a Q4 row with scale d_g, offset m_g per group g:
//   y[r] = sum_k d_g(k) * dx_k * I_k  +  sum_g m_g * S_g,   I_k = sum_{c in k} q[c] * xq[c]  (exact int)
// where S_g = sum_{c in g} x[c] in float (so the offset term is free of the x rounding). Symmetric
// weights use m_g = -8 d_g. Q8 rows (int8 w = code - 128, one scale d per row):
//   y[r] = d * sum_k dx_k * sum_{c in k} w[c] * xq[c].
//
// Integer dot products: AVX2 `vpmaddubsw` (u8 x s8 -> pairs of s16) + `vpmaddwd` with ones (-> s32);
// AVX-512 VNNI `vpdpbusd` (u8 x s8, 4 products summed into s32 lanes). Q8 codes are signed: AVX2
// takes |w| and moves w's sign onto xq (`vpsignb`); VNNI uses w + 128 (unsigned) and subtracts
// 128 * sum_k dx_k * sum(xq_k), one constant per x vector.
//
// Quantized x layout (per x vector), so that one load of weight bytes pairs with one load of xq:
//   Q4: blocks in quads of 4 (128 columns). Quad q = 128 bytes: [lo halves of blocks 4q..4q+3: 4 x 16
//       bytes (columns 0..15 of each)] then [hi halves (columns 16..31)]. A 64-byte load of the codes
//       of 4 blocks, masked with 0x0F, lines up with the lo part; shifted right by 4, with the hi part.
//       dxe: 16 floats per quad, dx of block 4q+i repeated 4 times (the 4 int32 lanes of that block).
//       AVX2 uses the same layout per pair of blocks (first / second 32 bytes of each part).
//   Q8: natural column order, blocks padded to pairs (64 bytes); dxe: dx of each block 8 times.
// Padding blocks have xq = 0 and dx = 0, weights past a row's end are read from a zeroed buffer.
//
// Prefill (B > 1): all rows of X are quantized once; each thread takes a range of weight rows and,
// for tiles of NB x-rows (8 with AVX-512, 4 with AVX2), unpacks each weight quad once and dots it
// with the NB x-rows; its weight rows stay in L2 across tiles. No dense weight is built.
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <torch/library.h>

#include "matvec.h"
#include "qmatvec.h"
#include "qx.h"

namespace sparseland {

// 0: AVX2, 1: AVX-512 VNNI (qx.h).
int qk::quant_isa() {
  static const int isa = [] {
    const char* env = std::getenv("SPARSELAND_QUANT_ISA");
    if (env != nullptr && std::strcmp(env, "avx2") == 0) return 0;
    __builtin_cpu_init();
    const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                    __builtin_cpu_supports("bmi2");
    return ok ? 1 : 0;
  }();
  return isa;
}


namespace {
using namespace qk;

// ---- AVX2 kernels ------------------------------------------------------------------------------

// The 4 block scales d of quad q of a row (sc = the row's scales): [d(4q), d(4q+1), d(4q+2), d(4q+3)].
// nt < 4: a row's last, partial quad (only nt blocks exist; the rest get 0 and are never read).
template <int BPG>
inline __m128 quad_scales(const uint16_t* sc, int64_t q, int nt) {
  if (nt < 4) {  // built in registers (a stack array read back as a vector stalls store forwarding)
    auto d = [&](int i) { return i < nt ? h2f(sc[(4 * q + i) / BPG]) : 0.0f; };
    return _mm_setr_ps(d(0), d(1), d(2), d(3));
  }
  if constexpr (BPG == 1) return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 4 * q)));
  if constexpr (BPG == 2) {
    uint32_t u;
    std::memcpy(&u, sc + 2 * q, 4);
    const __m128 d = _mm_cvtph_ps(_mm_cvtsi32_si128(int(u)));  // [d0, d1, 0, 0]
    return _mm_unpacklo_ps(d, d);                                // [d0, d0, d1, d1]
  }
  return _mm_set1_ps(h2f(sc[q]));
}

// Q4 rows [r0, r1) against NB quantized vectors: y[b * ys + r].
template <int BPG, int NB, bool ASYM>
void q4_rows_avx2(const uint8_t* codes, const uint16_t* scale, const uint16_t* offset, int64_t in, const QX* xs,
                  float* y, int64_t ys, int64_t r0, int64_t r1) {
  constexpr int U = NB == 1 ? 2 : 1;  // independent accumulator sets (FMA latency) for one vector
  const int64_t nblk = in / 32, nqf = nblk / 4, nt = nblk % 4, G = nblk / BPG;
  const __m256i m4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i lo_idx = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), hi_idx = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = codes + r * (in / 2);
    const uint16_t* sc = scale + r * G;
    __m256 acc[U][NB];
    for (int u = 0; u < U; ++u)
      for (int b = 0; b < NB; ++b) acc[u][b] = _mm256_setzero_ps();
    // blocks [4q + 2p, 4q + 2p + nb) of the row, nb = 2 (one 32-byte load) or 1 (a 16-byte load)
    auto quad = [&](const uint8_t* wq, __m128 d4, int64_t q, __m256* a, int nblocks = 4) {
      for (int p = 0; 2 * p < nblocks; ++p) {
        const __m256i v =
            2 * p + 1 < nblocks
                ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wq + 32 * p))
                : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wq + 32 * p)));
        const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4);
        const __m256 d8 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(d4), p ? hi_idx : lo_idx);
        for (int b = 0; b < NB; ++b) {
          const int8_t* xq = xs[b].xq + 128 * q + 32 * p;
          const __m256i s = _mm256_add_epi16(
              _mm256_maddubs_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq))),
              _mm256_maddubs_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 64))));
          const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)),
                                         _mm256_loadu_ps(xs[b].dxe + 16 * q + 8 * p));
          a[b] = _mm256_fmadd_ps(t, d8, a[b]);
        }
      }
    };
    int64_t q = 0;
    for (; q + U <= nqf; q += U)
      for (int u = 0; u < U; ++u) quad(w + 64 * (q + u), quad_scales<BPG>(sc, q + u, 4), q + u, acc[u]);
    for (; q < nqf; ++q) quad(w + 64 * q, quad_scales<BPG>(sc, q, 4), q, acc[0]);
    if (nt) quad(w + 64 * nqf, quad_scales<BPG>(sc, nqf, int(nt)), nqf, acc[0], int(nt));
    // offset term: sum_g m_g * S_g
    const uint16_t* mo = ASYM ? offset + r * G : sc;
    const __m256 mmul = _mm256_set1_ps(ASYM ? 1.0f : -8.0f);
    __m256 o[NB];
    for (int b = 0; b < NB; ++b) o[b] = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 8 <= G; g += 8) {
      const __m256 m = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mo + g))), mmul);
      for (int b = 0; b < NB; ++b) o[b] = _mm256_fmadd_ps(m, _mm256_loadu_ps(xs[b].sx + g), o[b]);
    }
    for (int b = 0; b < NB; ++b) {
      __m256 s = acc[0][b];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][b]);
      float t = hsum(_mm256_add_ps(s, o[b]));
      for (int64_t gg = g; gg < G; ++gg) t += h2f(mo[gg]) * (ASYM ? 1.0f : -8.0f) * xs[b].sx[gg];
      y[b * ys + r] = t;
    }
  }
}

// ---- AVX-512 VNNI kernels (compiled per function, chosen at run time) ---------------------------

template <int BPG>
QS_AVX512 inline __m128 quad_scales512(const uint16_t* sc, int64_t q, int nt) {
  // nt < 4 (a row's last quad; BPG 1 or 2, as in % group == 0): masked loads of the scales present
  if constexpr (BPG == 1)
    return _mm_cvtph_ps(nt < 4 ? _mm_maskz_loadu_epi16(static_cast<__mmask8>((1u << nt) - 1), sc + 4 * q)
                               : _mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc + 4 * q)));
  if constexpr (BPG == 2) {
    const __m128 d = _mm_cvtph_ps(_mm_maskz_loadu_epi16(nt < 4 ? 1 : 3, sc + 2 * q));  // [d0, d1, 0, 0]
    return _mm_unpacklo_ps(d, d);
  }
  return _mm_set1_ps(_cvtsh_ss(sc[q]));
}

// One quad (128 columns) of one Q4 row against NB vectors: a[b] += (d * dx) * I per int32 lane.
template <int NB>
QS_AVX512 inline void q4_quad512(__m512i v, __m128 d4, int64_t q, const QX* xs, __m512* a) {
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i didx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i lo = _mm512_and_si512(v, m4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
  const __m512 d16 = _mm512_permutexvar_ps(didx, _mm512_castps128_ps512(d4));
  for (int b = 0; b < NB; ++b) {
    const int8_t* xq = xs[b].xq + 128 * q;
    __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_loadu_si512(xq));
    i = _mm512_dpbusd_epi32(i, hi, _mm512_loadu_si512(xq + 64));
    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(i), _mm512_loadu_ps(xs[b].dxe + 16 * q));
    a[b] = _mm512_fmadd_ps(t, d16, a[b]);
  }
}

template <int BPG, int NB, bool ASYM>
QS_AVX512 void q4_rows512(const uint8_t* codes, const uint16_t* scale, const uint16_t* offset, int64_t in,
                          const QX* xs, float* y, int64_t ys, int64_t r0, int64_t r1) {
  constexpr int U = NB <= 2 ? 2 : 1;
  const int64_t nblk = in / 32, nqf = nblk / 4, nt = nblk % 4, G = nblk / BPG;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* w = codes + r * (in / 2);
    const uint16_t* sc = scale + r * G;
    __m512 acc[U][NB];
    for (int u = 0; u < U; ++u)
      for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
    int64_t q = 0;
    for (; q + U <= nqf; q += U)
      for (int u = 0; u < U; ++u)
        q4_quad512<NB>(_mm512_loadu_si512(w + 64 * (q + u)), quad_scales512<BPG>(sc, q + u, 4), q + u, xs, acc[u]);
    for (; q < nqf; ++q) q4_quad512<NB>(_mm512_loadu_si512(w + 64 * q), quad_scales512<BPG>(sc, q, 4), q, xs, acc[0]);
    if (nt)  // the row's last nt < 4 blocks: masked load, zeros past the row
      q4_quad512<NB>(_mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, 16 * nt), w + 64 * nqf),
                     quad_scales512<BPG>(sc, nqf, int(nt)), nqf, xs, acc[0]);
    const uint16_t* mo = ASYM ? offset + r * G : sc;
    const __m512 mmul = _mm512_set1_ps(ASYM ? 1.0f : -8.0f);
    __m512 o[NB];
    for (int b = 0; b < NB; ++b) o[b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g += 16) {
      const __mmask16 k = static_cast<__mmask16>(_bzhi_u32(0xFFFFu, unsigned(std::min<int64_t>(16, G - g))));
      const __m512 m = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, mo + g)), mmul);
      for (int b = 0; b < NB; ++b) o[b] = _mm512_fmadd_ps(m, _mm512_maskz_loadu_ps(k, xs[b].sx + g), o[b]);
    }
    for (int b = 0; b < NB; ++b) {
      __m512 s = _mm512_add_ps(acc[0][b], o[b]);
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][b]);
      y[b * ys + r] = _mm512_reduce_add_ps(s);
    }
  }
}

// ---- dispatch ----------------------------------------------------------------------------------

using Q4Fn = void (*)(const uint8_t*, const uint16_t*, const uint16_t*, int64_t, const QX*, float*, int64_t, int64_t,
                      int64_t);


template <int NB>
Q4Fn q4_kernel(int isa, int64_t bpg, bool asym) {
#define SL_Q4(B, A) (isa ? &q4_rows512<B, NB, A> : &q4_rows_avx2<B, (NB > 4 ? 4 : NB), A>)
  if (bpg == 1) return asym ? SL_Q4(1, true) : SL_Q4(1, false);
  if (bpg == 2) return asym ? SL_Q4(2, true) : SL_Q4(2, false);
  return asym ? SL_Q4(4, true) : SL_Q4(4, false);
#undef SL_Q4
}
}  // namespace

const char* quant_isa_name() { return qk::quant_isa() ? "avx512vnni" : "avx2"; }

void q4_mv(const uint8_t* codes, const at::Half* scale, const at::Half* offset, int64_t in, int64_t group,
           const float* x, float* y, int64_t r0, int64_t r1) {
  thread_local QXBuf buf;
  const QXSize s = q4_size(in, group);
  buf.fit(s, 1);
  quantize_q4(x, in, group, buf.xq.data(), buf.dxe.data(), buf.sx.data(), s.sx);
  const QX qx = buf.view(s, 0);
  const Q4Fn fn = q4_kernel<1>(quant_isa(), group / 32, offset != nullptr);
  fn(codes, reinterpret_cast<const uint16_t*>(scale), reinterpret_cast<const uint16_t*>(offset), in, &qx, y, 0, r0,
     r1);
}

// ---- torch ops ---------------------------------------------------------------------------------

at::Tensor q4_mm(at::Tensor codes, at::Tensor scale, std::optional<at::Tensor> offset, int64_t group, at::Tensor x) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kByte && codes.is_contiguous(),
              "q4_mm: codes must be a contiguous uint8 (out, in/2) tensor");
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "q4_mm: group must be 32, 64 or 128, got ", group);
  const int64_t out = codes.size(0), in = codes.size(1) * 2;
  TORCH_CHECK(in % group == 0, "q4_mm: in = ", in, " is not a multiple of the group ", group);
  const int64_t G = in / group;
  TORCH_CHECK(scale.dim() == 2 && scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.size(0) == out &&
                  scale.size(1) == G,
              "q4_mm: scale must be a contiguous float16 (out, in/group) = (", out, ", ", G, ") tensor, got ",
              scale.scalar_type(), " ", scale.sizes());
  const bool asym = offset.has_value() && offset->defined();
  if (asym)
    TORCH_CHECK(offset->dim() == 2 && offset->scalar_type() == at::kHalf && offset->is_contiguous() &&
                    offset->size(0) == out && offset->size(1) == G,
                "q4_mm: offset must be None or a contiguous float16 (out, in/group) = (", out, ", ", G, ") tensor");
  check_q_x(x, in, "q4_mm");
  const int64_t B = x.size(0);
  auto y = at::empty({B, out}, x.options());
  if (B == 0 || out == 0) return y;
  if (B == 1) {  // decode: the fused step's entry point, each thread quantizing x into its own buffer
    const auto* Sh = scale.data_ptr<at::Half>();
    const at::Half* Oh = asym ? offset->data_ptr<at::Half>() : nullptr;
    parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
      q4_mv(codes.data_ptr<uint8_t>(), Sh, Oh, in, group, x.data_ptr<float>(), y.data_ptr<float>(), r0, r1);
    });
    return y;
  }
  const QXSize s = q4_size(in, group);
  QXBuf buf;
  buf.fit(s, B);
  const float* X = x.data_ptr<float>();
  parallel_rows(B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      quantize_q4(X + b * in, in, group, buf.xq.data() + s.xq * b, buf.dxe.data() + s.dxe * b,
                  buf.sx.data() + s.sx * b, s.sx);
  });
  std::vector<QX> xs(B);
  for (int64_t b = 0; b < B; ++b) xs[b] = buf.view(s, b);
  const int isa = quant_isa();
  const uint8_t* C = codes.data_ptr<uint8_t>();
  const auto* S = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const auto* O = asym ? reinterpret_cast<const uint16_t*>(offset->data_ptr<at::Half>()) : nullptr;
  float* Y = y.data_ptr<float>();
  parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
    tiles(
        B, isa ? 8 : 4,
        [&](int nb) {
          switch (nb) {
            case 8: return q4_kernel<8>(isa, group / 32, asym);
            case 4: return q4_kernel<4>(isa, group / 32, asym);
            case 2: return q4_kernel<2>(isa, group / 32, asym);
            default: return q4_kernel<1>(isa, group / 32, asym);
          }
        },
        [&](Q4Fn fn, int64_t b0) { fn(C, S, O, in, xs.data() + b0, Y + b0 * out, out, r0, r1); });
  });
  return y;
}

std::string quant_isa_op() { return quant_isa_name(); }

// Benchmark helper: one single-vector pass over a chain of weights, as a model's decode step runs them
// (each matvec's rows split over torch's threads with parallel_rows), without Python in between.
// weights[i]: uint8 (Q4 codes, scales[i], offsets[i] if `offsets` is not empty), int8 (Q8 codes,
// scales[i]), float32 or bfloat16 (dense, dense_mv). xs: float32 vectors; weight i uses the first
// one whose length is its in_features. Returns the last output.
at::Tensor qmv_chain(std::vector<at::Tensor> weights, std::vector<at::Tensor> scales, std::vector<at::Tensor> offsets,
                     int64_t group, std::vector<at::Tensor> xs) {
  at::Tensor y;
  for (size_t i = 0; i < weights.size(); ++i) {
    const at::Tensor& w = weights[i];
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous(), "qmv_chain: weights must be contiguous 2-d tensors");
    const bool q4 = w.scalar_type() == at::kByte, q8 = w.scalar_type() == at::kChar;
    const int64_t out = w.size(0), in = q4 ? 2 * w.size(1) : w.size(1);
    const float* x = nullptr;
    for (const auto& v : xs)
      if (v.numel() == in && v.scalar_type() == at::kFloat && v.is_contiguous()) x = v.data_ptr<float>();
    TORCH_CHECK(x != nullptr, "qmv_chain: no float32 x of length ", in);
    if (q4 || q8) TORCH_CHECK(i < scales.size() && scales[i].scalar_type() == at::kHalf, "qmv_chain: scales");
    y = at::empty({out}, at::kFloat);
    float* Y = y.data_ptr<float>();
    parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
      if (q4)
        q4_mv(w.data_ptr<uint8_t>(), scales[i].data_ptr<at::Half>(),
              offsets.empty() ? nullptr : offsets[i].data_ptr<at::Half>(), in, group, x, Y, r0, r1);
      else if (q8)
        q8_mv(w.data_ptr<int8_t>(), scales[i].data_ptr<at::Half>(), in,
              scales[i].numel() == out ? 0 : in / (scales[i].numel() / out), x, Y, r0, r1);
      else if (w.scalar_type() == at::kFloat)
        dense_mv(w.data_ptr<float>(), x, Y, in, r0, r1);
      else
        dense_mv(w.data_ptr<at::BFloat16>(), x, Y, in, r0, r1);
    });
  }
  return y;
}

}  // namespace sparseland

TORCH_LIBRARY_FRAGMENT(sparseland, m) {
  m.def("q4_mm(Tensor codes, Tensor scale, Tensor? offset, int group, Tensor x) -> Tensor", &sparseland::q4_mm);
  m.def("quant_isa() -> str", &sparseland::quant_isa_op);
  m.def("qmv_chain(Tensor[] weights, Tensor[] scales, Tensor[] offsets, int group, Tensor[] xs) -> Tensor",
        &sparseland::qmv_chain);
}
