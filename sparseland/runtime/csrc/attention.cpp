// Sparse attention kernels, fp32, AVX2/FMA, on torch's threads.
//
// block_sparse_attention: causal prefill over selected key blocks. Each (head, query block) keeps a
// flash-attention style online softmax (FlashAttention, Dao et al. 2022: running row max m and sum l,
// O rescaled by 2^(m_old - m_new)) over only the key blocks its mask row selects; the diagonal block is
// always computed so every row attends at least to itself. Scores live in the log2 domain (q is
// pre-multiplied by scale * log2 e) so the softmax needs exp2 only. K is packed transposed per block,
// (D, bsp), V per block (bsp, Dp), both zero padded, so the two block GEMMs are plain 4x16 FMA tiles.
//
// sparse_decode_attention: one query per head over a list of key positions (Quest-style page/token
// selection), split into chunks of keys (flash-decoding) whose partial (m, l, o) are merged at the end.
#include <atomic>
#include <cmath>
#include <limits>
#include "common.h"

namespace sparseland {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 2^x for x <= 0; lanes below -126 (including -inf) give exactly 0. x = n + f, n = round(x),
// f in [-0.5, 0.5], 2^f by Cephes' exp2f polynomial (relative error ~2e-7).
inline __m256 exp2_neg(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-126.0f);
  const __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, n);
  __m256 p = _mm256_set1_ps(1.535336188319500e-4f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.339887440266574e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.618437357674640e-3f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.550332471162809e-2f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.402264791363012e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.931472028550421e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Run worker() once on each of torch's threads (or directly with one thread).
template <typename F>
void on_all_threads(const F& worker) {
  const int64_t nt = at::get_num_threads();
  if (nt <= 1) return worker();
  at::parallel_for(0, nt, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) worker();
  });
}

struct Prefill {
  int64_t H, KVH, T, D, bs, bsp, Dp, nb, G;
};

// Kt[g, j] (D, bsp): Kt[d][c] = k[g, j*bs + c, d]; Vp[g, j] (bsp, Dp): V rows; zeros past T, bs and D.
void pack_kv(const float* k, const float* v, float* Kt, float* Vp, const Prefill& s) {
  parallel_rows(s.KVH * s.nb, 1, [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; ++it) {
      const int64_t g = it / s.nb, t0 = (it % s.nb) * s.bs, n = std::min(s.bs, s.T - t0);
      float* kt = Kt + it * s.D * s.bsp;
      float* vp = Vp + it * s.bsp * s.Dp;
      std::fill(kt, kt + s.D * s.bsp, 0.0f);
      std::fill(vp, vp + s.bsp * s.Dp, 0.0f);
      const float* ks = k + (g * s.T + t0) * s.D;
      const float* vs = v + (g * s.T + t0) * s.D;
      for (int64_t c = 0; c < n; ++c) {
        for (int64_t d = 0; d < s.D; ++d) kt[d * s.bsp + c] = ks[c * s.D + d];
        std::copy(vs + c * s.D, vs + (c + 1) * s.D, vp + c * s.Dp);
      }
    }
  });
}

// S (nr, bsp) = Qs (nr, D) @ Kt (D, bsp); nr % 4 == 0, bsp % 16 == 0. Column tiles outer: the (D, 16)
// slice of Kt stays in L1 while all row tiles pass over it. On the diagonal block, tiles wholly above
// the diagonal (c0 > r0 + 3) are skipped: softmax_update masks them.
void qk_tile(const float* Qs, const float* kt, float* S, int64_t nr, int64_t bsp, int64_t D, bool diag) {
  for (int64_t c0 = 0; c0 < bsp; c0 += 16) {
    for (int64_t r0 = diag ? c0 : 0; r0 < nr; r0 += 4) {
      __m256 acc[4][2];
      for (int i = 0; i < 4; ++i) acc[i][0] = acc[i][1] = _mm256_setzero_ps();
      const float* q = Qs + r0 * D;
      for (int64_t d = 0; d < D; ++d) {
        const __m256 b0 = _mm256_loadu_ps(kt + d * bsp + c0), b1 = _mm256_loadu_ps(kt + d * bsp + c0 + 8);
        for (int i = 0; i < 4; ++i) {
          const __m256 a = _mm256_broadcast_ss(q + i * D + d);
          acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(S + (r0 + i) * bsp + c0, acc[i][0]);
        _mm256_storeu_ps(S + (r0 + i) * bsp + c0 + 8, acc[i][1]);
      }
    }
  }
}

// O (nr, Dp) += P (nr, bsp)[:, :nk] @ Vp (nk, Dp); Dp % 16 == 0. On the diagonal block rows r0..r0+3
// have P = 0 past column r0 + 3.
void pv_tile(const float* P, const float* vp, float* O, int64_t nr, int64_t nk, int64_t bsp, int64_t Dp, bool diag) {
  for (int64_t d0 = 0; d0 < Dp; d0 += 16) {
    for (int64_t r0 = 0; r0 < nr; r0 += 4) {
      const int64_t nc = diag ? std::min(nk, r0 + 4) : nk;
      __m256 acc[4][2];
      for (int i = 0; i < 4; ++i) {
        acc[i][0] = _mm256_loadu_ps(O + (r0 + i) * Dp + d0);
        acc[i][1] = _mm256_loadu_ps(O + (r0 + i) * Dp + d0 + 8);
      }
      const float* p = P + r0 * bsp;
      for (int64_t c = 0; c < nc; ++c) {
        const __m256 b0 = _mm256_loadu_ps(vp + c * Dp + d0), b1 = _mm256_loadu_ps(vp + c * Dp + d0 + 8);
        for (int i = 0; i < 4; ++i) {
          const __m256 a = _mm256_broadcast_ss(p + i * bsp + c);
          acc[i][0] = _mm256_fmadd_ps(a, b0, acc[i][0]);
          acc[i][1] = _mm256_fmadd_ps(a, b1, acc[i][1]);
        }
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(O + (r0 + i) * Dp + d0, acc[i][0]);
        _mm256_storeu_ps(O + (r0 + i) * Dp + d0 + 8, acc[i][1]);
      }
    }
  }
}

// Online-softmax update of rows [0, nr) with a score tile S (log2 domain); S becomes P in place.
// Valid columns of row r: [0, nk), and on the diagonal block only c <= r (causal).
void softmax_update(float* S, float* O, float* m, float* l, int64_t nr, int64_t nk, bool diag, int64_t bsp,
                    int64_t Dp) {
  for (int64_t r = 0; r < nr; ++r) {
    float* s = S + r * bsp;
    const int64_t lim = diag ? std::min(r + 1, nk) : nk;
    for (int64_t c = lim; c < bsp; ++c) s[c] = kNegInf;
    __m256 mx = _mm256_set1_ps(kNegInf);
    for (int64_t c = 0; c < bsp; c += 8) mx = _mm256_max_ps(mx, _mm256_loadu_ps(s + c));
    const float mnew = std::max(m[r], hmax(mx));  // finite: lim >= 1
    const __m256 mv = _mm256_set1_ps(mnew);
    __m256 sum = _mm256_setzero_ps();
    for (int64_t c = 0; c < bsp; c += 8) {
      const __m256 p = exp2_neg(_mm256_sub_ps(_mm256_loadu_ps(s + c), mv));
      _mm256_storeu_ps(s + c, p);
      sum = _mm256_add_ps(sum, p);
    }
    const float alpha = std::exp2(m[r] - mnew);  // 0 on the first block (m = -inf)
    l[r] = l[r] * alpha + hsum(sum);
    m[r] = mnew;
    if (alpha != 1.0f) {
      const __m256 av = _mm256_set1_ps(alpha);
      float* o = O + r * Dp;
      for (int64_t d = 0; d < Dp; d += 8) _mm256_storeu_ps(o + d, _mm256_mul_ps(av, _mm256_loadu_ps(o + d)));
    }
  }
}

}  // namespace

at::Tensor block_sparse_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor block_mask,
                                  int64_t block_size, double scale) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, "q, k, v must be (H, T, D) / (KVH, T, D)");
  for (const auto* t : {&q, &k, &v})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "q, k, v must be contiguous float32");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v must have the same shape");
  TORCH_CHECK(block_size >= 1, "block_size must be >= 1, got ", block_size);
  const int64_t H = q.size(0), T = q.size(1), D = q.size(2), KVH = k.size(0);
  TORCH_CHECK(k.size(1) == T && k.size(2) == D, "k, v must be (KVH, T, D) with q's T and D");
  TORCH_CHECK(KVH >= 1 && H % KVH == 0, "H (", H, ") must be a multiple of KVH (", KVH, ")");
  const int64_t nb = (T + block_size - 1) / block_size;
  TORCH_CHECK(block_mask.scalar_type() == at::kBool && block_mask.is_contiguous() && block_mask.dim() == 3 &&
                  block_mask.size(0) == H && block_mask.size(1) == nb && block_mask.size(2) == nb,
              "block_mask must be a contiguous bool (H, nb, nb) tensor with nb = ceil(T / block_size) = ", nb);
  auto out = at::empty_like(q);
  if (T == 0 || H == 0) return out;
  const Prefill s{H, KVH, T, D, block_size, round_up(block_size, 16), round_up(D, 16), nb, H / KVH};

  // Step 1: key block lists per (head, query block): causal j < i from the mask, then the diagonal.
  const bool* bm = block_mask.data_ptr<bool>();
  std::vector<int64_t> start(H * nb + 1, 0), cols;
  cols.reserve(H * nb);
  for (int64_t hi = 0; hi < H * nb; ++hi) {
    const int64_t i = hi % nb;
    for (int64_t j = 0; j < i; ++j)
      if (bm[hi * nb + j]) cols.push_back(j);
    cols.push_back(i);
    start[hi + 1] = static_cast<int64_t>(cols.size());
  }
  // Longest work first, handed out from an atomic counter: balanced threads without a static split.
  std::vector<int64_t> order(H * nb);
  for (int64_t x = 0; x < H * nb; ++x) order[x] = x;
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return start[a + 1] - start[a] > start[b + 1] - start[b]; });

  // Step 2: pack K (transposed) and V per block.
  std::vector<float> Kt(KVH * nb * D * s.bsp), Vp(KVH * nb * s.bsp * s.Dp);
  pack_kv(k.data_ptr<float>(), v.data_ptr<float>(), Kt.data(), Vp.data(), s);

  // Step 3: online softmax over the selected blocks of each (head, query block).
  const float qscale = static_cast<float>(scale) * kLog2e;
  const float* Q = q.data_ptr<float>();
  float* Y = out.data_ptr<float>();
  std::atomic<int64_t> next{0};
  on_all_threads([&]() {
    std::vector<float> Qs(s.bsp * D), S(s.bsp * s.bsp), O(s.bsp * s.Dp), m(s.bsp), l(s.bsp);
    for (int64_t x = next.fetch_add(1); x < H * nb; x = next.fetch_add(1)) {
      const int64_t hi = order[x], h = hi / nb, i = hi % nb, g = h / s.G;
      const int64_t q0 = i * s.bs, nq = std::min(s.bs, T - q0), nr = round_up(nq, 4);
      const float* qh = Q + (h * T + q0) * D;  // (nq, D)
      for (int64_t r = 0; r < nr; ++r)
        for (int64_t d = 0; d < D; ++d) Qs[r * D + d] = r < nq ? qh[r * D + d] * qscale : 0.0f;
      std::fill(O.begin(), O.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNegInf);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t e = start[hi]; e < start[hi + 1]; ++e) {
        const int64_t j = cols[e], nk = std::min(s.bs, T - j * s.bs);
        const float* kt = Kt.data() + (g * nb + j) * D * s.bsp;  // (D, bsp)
        const float* vp = Vp.data() + (g * nb + j) * s.bsp * s.Dp;  // (bsp, Dp)
        qk_tile(Qs.data(), kt, S.data(), nr, s.bsp, D, j == i);
        softmax_update(S.data(), O.data(), m.data(), l.data(), nr, nk, j == i, s.bsp, s.Dp);
        pv_tile(S.data(), vp, O.data(), nr, nk, s.bsp, s.Dp, j == i);
      }
      float* y = Y + (h * T + q0) * D;  // (nq, D)
      for (int64_t r = 0; r < nq; ++r) {
        const float inv = 1.0f / l[r];
        for (int64_t d = 0; d < D; ++d) y[r * D + d] = O[r * s.Dp + d] * inv;
      }
    }
  });
  return out;
}

// ----- decode ----------------------------------------------------------------------------------------

namespace {

constexpr int64_t kChunk = 256;  // keys per work item (flash-decoding split)

// Four dot products -> one __m128: lane t = sum of a_t's eight lanes.
inline __m128 hsum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

struct Decode {
  int64_t H, KVH, S, D, K, G, nc;
  int64_t ks0, ks1, vs0, vs1;  // strides (elements) of the caches' head and position dims
};

// Partial attention of head h over keys [t0, t1) of its list: scores (log2 domain), max, exp2, sum, P @ V.
void decode_chunk(const float* qs, const float* Kc, const float* Vc, const int64_t* idx, const Decode& s,
                  int64_t h, int64_t t0, int64_t t1, float* pm, float* pl, float* po) {
  alignas(32) float sc[kChunk + 8];
  const int64_t g = h / s.G, n = t1 - t0, D8 = s.D & ~int64_t(7);
  const float* kh = Kc + g * s.ks0;
  const float* vh = Vc + g * s.vs0;
  auto pos = [&](int64_t t) { return idx ? idx[t0 + t] : t0 + t; };
  auto dot = [&](const float* kr, __m256& acc) {
    for (int64_t d = 0; d < D8; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qs + d), _mm256_loadu_ps(kr + d), acc);
  };
  auto tail = [&](const float* kr) {
    float r = 0.0f;
    for (int64_t d = D8; d < s.D; ++d) r += qs[d] * kr[d];
    return r;
  };
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const float* kr[4] = {kh + pos(t) * s.ks1, kh + pos(t + 1) * s.ks1, kh + pos(t + 2) * s.ks1,
                          kh + pos(t + 3) * s.ks1};
    if (t + 8 <= n)
      for (int u = 4; u < 8; ++u) _mm_prefetch(reinterpret_cast<const char*>(kh + pos(t + u) * s.ks1), _MM_HINT_T0);
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int u = 0; u < 4; ++u) dot(kr[u], a[u]);
    _mm_storeu_ps(sc + t, hsum4(a[0], a[1], a[2], a[3]));
    for (int u = 0; u < 4; ++u) sc[t + u] += tail(kr[u]);
  }
  for (; t < n; ++t) {
    const float* kr = kh + pos(t) * s.ks1;
    __m256 a = _mm256_setzero_ps();
    dot(kr, a);
    sc[t] = hsum(a) + tail(kr);
  }
  const int64_t n8 = round_up(n, 8);
  for (int64_t u = n; u < n8; ++u) sc[u] = kNegInf;
  __m256 mx = _mm256_set1_ps(kNegInf);
  for (int64_t u = 0; u < n8; u += 8) mx = _mm256_max_ps(mx, _mm256_load_ps(sc + u));
  const float m = hmax(mx);
  const __m256 mv = _mm256_set1_ps(m);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t u = 0; u < n8; u += 8) {
    const __m256 p = exp2_neg(_mm256_sub_ps(_mm256_load_ps(sc + u), mv));
    _mm256_store_ps(sc + u, p);
    sum = _mm256_add_ps(sum, p);
  }
  *pm = m;
  *pl = hsum(sum);
  std::fill(po, po + s.D, 0.0f);
  for (int64_t u = 0; u < n; ++u) {
    const float* vr = vh + pos(u) * s.vs1;
    if (u + 4 < n) _mm_prefetch(reinterpret_cast<const char*>(vh + pos(u + 4) * s.vs1), _MM_HINT_T0);
    const __m256 p = _mm256_set1_ps(sc[u]);
    for (int64_t d = 0; d < D8; d += 8)
      _mm256_storeu_ps(po + d, _mm256_fmadd_ps(p, _mm256_loadu_ps(vr + d), _mm256_loadu_ps(po + d)));
    for (int64_t d = D8; d < s.D; ++d) po[d] += sc[u] * vr[d];
  }
}

at::Tensor decode_impl(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* idx, int64_t K,
                       double scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kFloat && q.is_contiguous(), "q must be a contiguous float32 (H, D)");
  TORCH_CHECK(k.dim() == 3 && v.dim() == 3 && k.sizes() == v.sizes(), "k_cache, v_cache must both be (KVH, S, D)");
  TORCH_CHECK(k.scalar_type() == at::kFloat && v.scalar_type() == at::kFloat, "k_cache, v_cache must be float32");
  TORCH_CHECK(k.stride(2) == 1 && v.stride(2) == 1, "k_cache, v_cache must have contiguous rows (stride 1 in D)");
  const int64_t H = q.size(0), D = q.size(1), KVH = k.size(0), S = k.size(1);
  TORCH_CHECK(k.size(2) == D, "k_cache has D = ", k.size(2), ", q has ", D);
  TORCH_CHECK(KVH >= 1 && H % KVH == 0, "H (", H, ") must be a multiple of KVH (", KVH, ")");
  TORCH_CHECK(K >= 1, "each head must attend at least one key");
  const Decode s{H, KVH, S, D, K, H / KVH, (K + kChunk - 1) / kChunk, k.stride(0), k.stride(1), v.stride(0), v.stride(1)};
  auto out = at::empty({H, D}, q.options());
  std::vector<float> qs(H * D), pm(H * s.nc), pl(H * s.nc), po(H * s.nc * D);
  const float qscale = static_cast<float>(scale) * kLog2e;
  const float* Q = q.data_ptr<float>();
  for (int64_t x = 0; x < H * D; ++x) qs[x] = Q[x] * qscale;
  const float *Kc = k.data_ptr<float>(), *Vc = v.data_ptr<float>();
  parallel_rows(H * s.nc, 1, [&](int64_t a, int64_t b) {
    for (int64_t it = a; it < b; ++it) {
      const int64_t h = it / s.nc, t0 = (it % s.nc) * kChunk, t1 = std::min(K, t0 + kChunk);
      decode_chunk(qs.data() + h * D, Kc, Vc, idx ? idx + h * K : nullptr, s, h, t0, t1, &pm[it], &pl[it],
                   po.data() + it * D);
    }
  });
  // Merge the chunks of each head: weights 2^(m_c - M).
  float* Y = out.data_ptr<float>();
  for (int64_t h = 0; h < H; ++h) {
    float M = kNegInf, L = 0.0f;
    for (int64_t c = 0; c < s.nc; ++c) M = std::max(M, pm[h * s.nc + c]);
    std::fill(Y + h * D, Y + (h + 1) * D, 0.0f);
    for (int64_t c = 0; c < s.nc; ++c) {
      const float w = std::exp2(pm[h * s.nc + c] - M);
      L += w * pl[h * s.nc + c];
      for (int64_t d = 0; d < D; ++d) Y[h * D + d] += w * po[(h * s.nc + c) * D + d];
    }
    for (int64_t d = 0; d < D; ++d) Y[h * D + d] /= L;
  }
  return out;
}

}  // namespace

at::Tensor sparse_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor indices,
                                   double scale) {
  TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kLong && indices.is_contiguous(),
              "indices must be a contiguous int64 (H, K) tensor");
  TORCH_CHECK(q.dim() == 2 && indices.size(0) == q.size(0), "indices must have one row per query head");
  TORCH_CHECK(k_cache.dim() == 3, "k_cache must be (KVH, S, D)");
  const int64_t S = k_cache.size(1);
  const int64_t* idx = indices.data_ptr<int64_t>();
  for (int64_t x = 0; x < indices.numel(); ++x)
    TORCH_CHECK(idx[x] >= 0 && idx[x] < S, "indices must lie in [0, S = ", S, "), got ", idx[x]);
  return decode_impl(q, k_cache, v_cache, idx, indices.size(1), scale);
}

at::Tensor dense_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, double scale) {
  TORCH_CHECK(k_cache.dim() == 3, "k_cache must be (KVH, S, D)");
  return decode_impl(q, k_cache, v_cache, nullptr, k_cache.size(1), scale);
}

}  // namespace sparseland
