// Dense int8 matmuls: Y (B, out) = X (B, in) @ W^T with W in the Q8 layout of qmatvec.h, one float16
// scale per row (scheme int8) or per row and group of 32/64/128 columns (int8-g32: llama.cpp's Q8_0 grid,
// the shipped embedded model's token_embd exactly). x is quantized per block of 32 (qx.h).
//
//   per row:   y[r] = d_r * sum_k dx_k * I_k               I_k = sum_{c in k} w[c] * xq[c]  (exact int)
//   groups:    y[r] = sum_k d_{r, k / (group/32)} * dx_k * I_k
//
// AVX2 takes |w| and moves w's sign onto xq (`vpsignb`), so I_k is exact. AVX-512 VNNI multiplies
// w + 128 (unsigned) with xq (`vpdpbusd`): per row it subtracts 128 * sum_k dx_k * sum(xq_k) once at
// the end (one constant per x vector); with group scales each int32 lane starts from -128 times the sum
// of its 4 xq bytes (QX::xc), which makes every lane's I exact before its block's scale multiplies it.
#include <torch/library.h>

#include "qmatvec.h"
#include "qx.h"

namespace sparseland {

namespace {
using namespace qk;

// Q8 rows [r0, r1) against NB quantized vectors: y[b * ys + r]. GS: scale (out, in / group), the block
// k's scale at k >> gshift; else scale (out,).
template <int NB, bool GS>
void q8_rows_avx2(const int8_t* codes, const uint16_t* scale, int gshift, int64_t in, const QX* xs, float* y,
                  int64_t ys, int64_t r0, int64_t r1) {
  constexpr int U = NB == 1 ? 2 : 1;
  const int64_t nbf = in / 32, rem = in % 32, G = GS ? (nbf >> gshift) : 1;
  const __m256i ones = _mm256_set1_epi16(1);
  alignas(32) int8_t tail[32];
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* w = codes + r * in;
    const uint16_t* sc = scale + r * G;
    __m256 acc[U][NB];
    for (int u = 0; u < U; ++u)
      for (int b = 0; b < NB; ++b) acc[u][b] = _mm256_setzero_ps();
    auto block = [&](const int8_t* wk, int64_t k, __m256* a) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wk));
      const __m256i av = _mm256_sign_epi8(v, v);  // |w| as u8 (|-128| = 128)
      const __m256 dk = _mm256_set1_ps(GS ? h2f(sc[k >> gshift]) : 1.0f);
      for (int b = 0; b < NB; ++b) {
        const __m256i sx =
            _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs[b].xq + 32 * k)), v);
        const __m256i i = _mm256_madd_epi16(_mm256_maddubs_epi16(av, sx), ones);  // |w| |x| <= 128*127: no overflow
        __m256 dx = _mm256_loadu_ps(xs[b].dxe + 8 * k);
        if constexpr (GS) dx = _mm256_mul_ps(dx, dk);
        a[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), dx, a[b]);
      }
    };
    int64_t k = 0;
    for (; k + U <= nbf; k += U)
      for (int u = 0; u < U; ++u) block(w + 32 * (k + u), k + u, acc[u]);
    for (; k < nbf; ++k) block(w + 32 * k, k, acc[0]);
    if (rem) {  // per row only: with groups, in % 32 == 0
      std::memset(tail, 0, sizeof(tail));
      std::memcpy(tail, w + 32 * nbf, rem);
      block(tail, nbf, acc[0]);
    }
    const float d = GS ? 1.0f : h2f(scale[r]);
    for (int b = 0; b < NB; ++b) {
      __m256 s = acc[0][b];
      for (int u = 1; u < U; ++u) s = _mm256_add_ps(s, acc[u][b]);
      y[b * ys + r] = d * hsum(s);
    }
  }
}

// One pair p of blocks (64 columns) of one row against NB vectors. d16: GS only, the scales of blocks 2p
// (lanes 0-7) and 2p + 1 (lanes 8-15).
template <int NB, bool GS>
QS_AVX512 inline void q8_pair512(__m512i w, int64_t p, const QX* xs, __m512 d16, __m512* a) {
  const __m512i u8 = _mm512_xor_si512(w, _mm512_set1_epi8(static_cast<char>(0x80)));  // w + 128
  for (int b = 0; b < NB; ++b) {
    const __m512i init = GS ? _mm512_loadu_si512(xs[b].xc + 16 * p) : _mm512_setzero_si512();
    const __m512i i = _mm512_dpbusd_epi32(init, u8, _mm512_loadu_si512(xs[b].xq + 64 * p));
    __m512 dx = _mm512_loadu_ps(xs[b].dxe + 16 * p);
    if constexpr (GS) dx = _mm512_mul_ps(dx, d16);
    a[b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), dx, a[b]);
  }
}

// The scales of blocks 2p (lanes 0-7) and 2p + 1 (lanes 8-15; 0 past the last block) of a row.
QS_AVX512 inline __m512 pair_scales512(const uint16_t* sc, int64_t p, int gshift, int64_t nblk) {
  const int64_t k = 2 * p;
  const float d0 = h2f(sc[k >> gshift]), d1 = k + 1 < nblk ? h2f(sc[(k + 1) >> gshift]) : 0.0f;
  return _mm512_mask_blend_ps(__mmask16(0xFF00), _mm512_set1_ps(d0), _mm512_set1_ps(d1));
}

template <int NB, bool GS>
QS_AVX512 void q8_rows512(const int8_t* codes, const uint16_t* scale, int gshift, int64_t in, const QX* xs, float* y,
                          int64_t ys, int64_t r0, int64_t r1) {
  constexpr int U = NB <= 2 ? 2 : 1;
  const int64_t npf = in / 64, rem = in % 64, nblk = (in + 31) / 32, G = GS ? (nblk >> gshift) : 1;
  for (int64_t r = r0; r < r1; ++r) {
    const int8_t* w = codes + r * in;
    const uint16_t* sc = scale + r * G;
    auto d16 = [&](int64_t p) { return GS ? pair_scales512(sc, p, gshift, nblk) : __m512{}; };
    __m512 acc[U][NB];
    for (int u = 0; u < U; ++u)
      for (int b = 0; b < NB; ++b) acc[u][b] = _mm512_setzero_ps();
    int64_t p = 0;
    for (; p + U <= npf; p += U)
      for (int u = 0; u < U; ++u)
        q8_pair512<NB, GS>(_mm512_loadu_si512(w + 64 * (p + u)), p + u, xs, d16(p + u), acc[u]);
    for (; p < npf; ++p) q8_pair512<NB, GS>(_mm512_loadu_si512(w + 64 * p), p, xs, d16(p), acc[0]);
    if (rem)  // padded columns: w = 0 (u8 128) meets xq = 0 (and xc = 0)
      q8_pair512<NB, GS>(_mm512_maskz_loadu_epi8(_bzhi_u64(~0ull, unsigned(rem)), w + 64 * npf), npf, xs, d16(npf),
                         acc[0]);
    const float d = GS ? 1.0f : _cvtsh_ss(scale[r]);
    for (int b = 0; b < NB; ++b) {
      __m512 s = acc[0][b];
      for (int u = 1; u < U; ++u) s = _mm512_add_ps(s, acc[u][b]);
      y[b * ys + r] = GS ? _mm512_reduce_add_ps(s) : d * (_mm512_reduce_add_ps(s) - xs[b].c);
    }
  }
}

using Q8Fn = void (*)(const int8_t*, const uint16_t*, int, int64_t, const QX*, float*, int64_t, int64_t, int64_t);

template <int NB>
Q8Fn q8_kernel(int isa, bool gs) {
  if (isa) return gs ? &q8_rows512<NB, true> : &q8_rows512<NB, false>;
  constexpr int N2 = NB > 4 ? 4 : NB;
  return gs ? &q8_rows_avx2<N2, true> : &q8_rows_avx2<N2, false>;
}

inline int group_shift(int64_t group) { return group == 64 ? 1 : (group == 128 ? 2 : 0); }

}  // namespace

void q8_mv(const int8_t* codes, const at::Half* scale, int64_t in, int64_t group, const float* x, float* y, int64_t r0,
           int64_t r1) {
  thread_local QXBuf buf;
  const QXSize s = q8_size(in);
  buf.fit(s, 1);
  const int isa = quant_isa();
  buf.c[0] = quantize_q8(x, in, buf.xq.data(), buf.dxe.data(), group && isa ? buf.xc.data() : nullptr);
  const QX qx = buf.view(s, 0);
  q8_kernel<1>(isa, group != 0)(codes, reinterpret_cast<const uint16_t*>(scale), group_shift(group), in, &qx, y, 0, r0,
                                r1);
}

at::Tensor q8_mm(at::Tensor codes, at::Tensor scale, at::Tensor x) {
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "q8_mm: codes must be a contiguous int8 (out, in) tensor");
  const int64_t out = codes.size(0), in = codes.size(1);
  const int64_t G = scale.dim() == 2 ? scale.size(1) : 1;
  const int64_t group = G == 1 ? 0 : (G > 0 && in % G == 0 ? in / G : -1);
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.size(0) == out &&
                  scale.dim() <= 2 && (group == 0 || group == 32 || group == 64 || group == 128),
              "q8_mm: scale must be a contiguous float16 (out, 1) tensor, or (out, in/group) with group 32, 64 or 128,",
              " for out = ", out, ", in = ", in, "; got ", scale.scalar_type(), " ", scale.sizes());
  check_q_x(x, in, "q8_mm");
  const int64_t B = x.size(0);
  auto y = at::empty({B, out}, x.options());
  if (B == 0 || out == 0) return y;
  if (B == 1) {
    parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
      q8_mv(codes.data_ptr<int8_t>(), scale.data_ptr<at::Half>(), in, group, x.data_ptr<float>(), y.data_ptr<float>(),
            r0, r1);
    });
    return y;
  }
  const QXSize s = q8_size(in);
  QXBuf buf;
  buf.fit(s, B);
  const float* X = x.data_ptr<float>();
  const int isa = quant_isa();
  parallel_rows(B, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      buf.c[b] = quantize_q8(X + b * in, in, buf.xq.data() + s.xq * b, buf.dxe.data() + s.dxe * b,
                             group && isa ? buf.xc.data() + s.xc * b : nullptr);
  });
  std::vector<QX> xs(B);
  for (int64_t b = 0; b < B; ++b) xs[b] = buf.view(s, b);
  const int8_t* C = codes.data_ptr<int8_t>();
  const auto* S = reinterpret_cast<const uint16_t*>(scale.data_ptr<at::Half>());
  const int gs = group_shift(group);
  float* Y = y.data_ptr<float>();
  parallel_rows(out, 16, [&](int64_t r0, int64_t r1) {
    tiles(
        B, isa ? 8 : 4,
        [&](int nb) {
          switch (nb) {
            case 8: return q8_kernel<8>(isa, group != 0);
            case 4: return q8_kernel<4>(isa, group != 0);
            case 2: return q8_kernel<2>(isa, group != 0);
            default: return q8_kernel<1>(isa, group != 0);
          }
        },
        [&](Q8Fn fn, int64_t b0) { fn(C, S, gs, in, xs.data() + b0, Y + b0 * out, out, r0, r1); });
  });
  return y;
}

}  // namespace sparseland

TORCH_LIBRARY_FRAGMENT(sparseland, m) {
  m.def("q8_mm(Tensor codes, Tensor scale, Tensor x) -> Tensor", &sparseland::q8_mm);
}
