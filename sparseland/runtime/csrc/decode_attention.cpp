// The fused decode step's attention stage: norms, q/k/v extras, RoPE, and one query head's attention
// over the float32 cache or the int8 one (set_int8_cache), with a sliding window and soft-capping.
#include <algorithm>
#include <cmath>
#include <limits>

#include "decode_step.h"

namespace sparseland {
namespace decode {

// out = (offset + w) * h / sqrt(mean(h^2) + eps), as LlamaRMSNorm (offset 0) or Gemma's (offset 1) in
// float32; out may be h.
void rmsnorm(const float* h, const Norm& n, float offset, float* out, int64_t len) {
  double ss = 0;
  for (int64_t i = 0; i < len; ++i) ss += double(h[i]) * h[i];
  const float r = 1.0f / std::sqrt(float(ss / double(len)) + n.eps);
  if (offset == 0.0f)
    for (int64_t i = 0; i < len; ++i) out[i] = n.w[i] * (h[i] * r);
  else
    for (int64_t i = 0; i < len; ++i) out[i] = (h[i] * r) * (offset + n.w[i]);
}

// out = (h - mean) / sqrt(var + eps) * w + b (biased variance), as torch's LayerNorm in float32; out may be h.
static void layernorm(const float* h, const Norm& n, float* out, int64_t len) {
  double s = 0;
  for (int64_t i = 0; i < len; ++i) s += h[i];
  const float mean = float(s / double(len));
  double ss = 0;
  for (int64_t i = 0; i < len; ++i) ss += double(h[i] - mean) * (h[i] - mean);
  const float r = 1.0f / std::sqrt(float(ss / double(len)) + n.eps);
  for (int64_t i = 0; i < len; ++i) out[i] = (h[i] - mean) * r * n.w[i] + (n.b != nullptr ? n.b[i] : 0.0f);
}

void apply_norm(const float* h, const Norm& n, float offset, float* out, int64_t len) {
  if (n.ln) layernorm(h, n, out, len);
  else rmsnorm(h, n, offset, out, len);
}

// Step 2a: q, k, v += their biases; q and k RMS-normed per head (Qwen3, Gemma 3) or over all heads (OLMo 2).
void qkv_extras(const Layer& ly, float* q, float* k, float* v, int64_t H, int64_t KVH, int64_t D) {
  if (ly.bq != nullptr)
    for (int64_t i = 0; i < H * D; ++i) q[i] += ly.bq[i];
  if (ly.bk != nullptr)
    for (int64_t i = 0; i < KVH * D; ++i) k[i] += ly.bk[i];
  if (ly.bv != nullptr)
    for (int64_t i = 0; i < KVH * D; ++i) v[i] += ly.bv[i];
  if (ly.qk_norm == kHeadNorm) {
    for (int64_t hh = 0; hh < H; ++hh) rmsnorm(q + hh * D, ly.qn, ly.norm_offset, q + hh * D, D);
    for (int64_t kh = 0; kh < KVH; ++kh) rmsnorm(k + kh * D, ly.kn, ly.norm_offset, k + kh * D, D);
  } else if (ly.qk_norm == kAllNorm) {
    rmsnorm(q, ly.qn, ly.norm_offset, q, H * D);
    rmsnorm(k, ly.kn, ly.norm_offset, k, KVH * D);
  }
}

// In place: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), over x's first D entries (the
// rotary dims; a partial rotary leaves the rest of the head as it is).
void rope(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Symmetric int8 of one vector x (n,), as generate.py quantize_kv: codes and the scale max|x| / 127.
float quantize_i8(const float* x, int8_t* codes, int64_t n) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const float s = amax / 127.0f;
  const float div = s > 0.0f ? s : 1.0f;
  for (int64_t i = 0; i < n; ++i)
    codes[i] = int8_t(std::clamp(std::nearbyint(x[i] / div), -127.0f, 127.0f));  // round half to even
  return s;
}

namespace {

// 8 int8 codes -> 8 floats.
inline __m256 load_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// q . codes over n entries (the int8 key's scale applied by the caller).
float dot_i8(const float* a, const int8_t* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load_i8(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * float(b[i]);
  return s;
}

// o += w * codes over n entries.
void axpy_i8(float w, const int8_t* b, float* o, int64_t n) {
  const __m256 wv = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(o + i, _mm256_fmadd_ps(wv, load_i8(b + i), _mm256_loadu_ps(o + i)));
  for (; i < n; ++i) o[i] += w * float(b[i]);
}

// [sum(a[0]), ..., sum(a[7])]
inline __m256 hsum8(const __m256* a) {
  const __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

// sc[t] = ks[t] * (q . codes[t]) * scale for t < n (rows of D = 8 * N codes), 8 positions at a time;
// returns max_t sc[t].
template <int N>
float scores_i8(const float* q, const int8_t* codes, const float* ks, float scale, int64_t n, float* sc) {
  const __m256 sv = _mm256_set1_ps(scale);
  __m256 mx = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    __m256 a[8];
    for (int i = 0; i < 8; ++i) {
      const int8_t* c = codes + (t + i) * (8 * N);
      a[i] = _mm256_mul_ps(_mm256_loadu_ps(q), load_i8(c));
      for (int j = 1; j < N; ++j) a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * j), load_i8(c + 8 * j), a[i]);
    }
    const __m256 s = _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(ks + t), hsum8(a)), sv);
    _mm256_storeu_ps(sc + t, s);
    mx = _mm256_max_ps(mx, s);
  }
  float m = -std::numeric_limits<float>::infinity();
  alignas(32) float buf[8];
  _mm256_store_ps(buf, mx);
  for (float b : buf) m = std::max(m, b);
  for (; t < n; ++t) m = std::max(m, sc[t] = ks[t] * dot_i8(q, codes + t * (8 * N), 8 * N) * scale);
  return m;
}

// o = sum_t w[t] * codes[t] over t < n (rows of D = 8 * N codes), N accumulators held in registers.
template <int N>
void weighted_sum_i8(const float* w, const int8_t* codes, int64_t n, float* o) {
  __m256 acc[N];
  for (int j = 0; j < N; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m256 wv = _mm256_set1_ps(w[t]);
    const int8_t* c = codes + t * (8 * N);
    for (int j = 0; j < N; ++j) acc[j] = _mm256_fmadd_ps(wv, load_i8(c + 8 * j), acc[j]);
  }
  for (int j = 0; j < N; ++j) _mm256_storeu_ps(o + 8 * j, acc[j]);
}

// Soft-capping of sc[0, n) (cap * tanh(s / cap), Gemma 2); returns the new maximum.
float softcap(float* sc, int64_t n, float cap) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t t = 0; t < n; ++t) m = std::max(m, sc[t] = std::tanh(sc[t] / cap) * cap);
  return m;
}

// The first position a layer's query at p1 - 1 sees: p1 - window for a sliding-window layer, else 0.
inline int64_t first_key(const Layer& ly, int64_t p1) { return ly.window > 0 ? std::max<int64_t>(0, p1 - ly.window) : 0; }

}  // namespace
}  // namespace decode

using namespace decode;

// Step 3 on the float cache: each query head of layer l over positions [first_key, p1), into att_.
void DecodeStep::attend(const Exec& ex, int64_t l, const float* q, const float* kc, const float* vc, int64_t p1) {
  const Layer& ly = layers_[l];
  const int64_t G = H_ / KVH_, t0 = first_key(ly, p1), n = p1 - t0;
  ex.split(H_, [&](int64_t h0, int64_t h1) {
    for (int64_t hh = h0; hh < h1; ++hh) {
      const int64_t kh = hh / G;
      const float* qh = q + hh * D_;
      const float* K = kc + kh * Tmax_ * D_;
      const float* V = vc + kh * Tmax_ * D_;
      if (quest_layer(l)) {
        quest_head(l, hh, qh, K, V, p1, att_.data() + hh * D_);
        continue;
      }
      K += t0 * D_, V += t0 * D_;
      float* sc = scores_.data() + hh * Tmax_;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t t = 0; t < n; ++t) m = std::max(m, sc[t] = dot(qh, K + t * D_, D_) * scale_);
      if (ly.softcap > 0) m = softcap(sc, n, ly.softcap);
      float sum = 0;
      for (int64_t t = 0; t < n; ++t) sum += sc[t] = std::exp(sc[t] - m);
      float* o = att_.data() + hh * D_;
      std::fill(o, o + D_, 0.0f);
      for (int64_t t = 0; t < n; ++t) {
        const float p = sc[t] / sum;
        const float* vt = V + t * D_;
        for (int64_t d = 0; d < D_; ++d) o[d] += p * vt[d];
      }
    }
  });
}

// Step 3 on the int8 cache: each query head of layer l over positions [first_key, p1), into att_.
void DecodeStep::attend_int8(const Exec& ex, int64_t l, const float* q, int64_t p1) {
  const Layer& ly = layers_[l];
  const int64_t G = H_ / KVH_, t0 = first_key(ly, p1), n = p1 - t0;
  ex.split(H_, [&](int64_t h0, int64_t h1) {
    for (int64_t hh = h0; hh < h1; ++hh) {
      const int64_t row = l * KVH_ * Tmax_ + (hh / G) * Tmax_ + t0;  // (layer, kv head, t0) row of the scales
      const float* qh = q + hh * D_;
      const int8_t* K = kq_.data_ptr<int8_t>() + row * D_;
      const int8_t* V = vq_.data_ptr<int8_t>() + row * D_;
      const float* Ks = ks_.data_ptr<float>() + row;
      const float* Vs = vs_.data_ptr<float>() + row;
      float* sc = scores_.data() + hh * Tmax_;
      float m = -std::numeric_limits<float>::infinity();
      if (D_ == 64) m = scores_i8<8>(qh, K, Ks, scale_, n, sc);
      else if (D_ == 128) m = scores_i8<16>(qh, K, Ks, scale_, n, sc);
      else if (D_ == 32) m = scores_i8<4>(qh, K, Ks, scale_, n, sc);
      else
        for (int64_t t = 0; t < n; ++t) m = std::max(m, sc[t] = Ks[t] * dot_i8(qh, K + t * D_, D_) * scale_);
      if (ly.softcap > 0) m = softcap(sc, n, ly.softcap);
      float sum = 0;
      for (int64_t t = 0; t < n; ++t) sum += sc[t] = std::exp(sc[t] - m);
      float* o = att_.data() + hh * D_;
      const float inv = 1.0f / sum;
      for (int64_t t = 0; t < n; ++t) sc[t] *= inv * Vs[t];  // p_t * scale_v[t]
      if (D_ == 64) weighted_sum_i8<8>(sc, V, n, o);
      else if (D_ == 128) weighted_sum_i8<16>(sc, V, n, o);
      else if (D_ == 32) weighted_sum_i8<4>(sc, V, n, o);
      else {
        std::fill(o, o + D_, 0.0f);
        for (int64_t t = 0; t < n; ++t) axpy_i8(sc[t], V + t * D_, o, D_);
      }
    }
  });
}

// Run on an int8 KV cache instead of the float one (the constructor's float caches are then unused,
// e.g. (L, KVH, 0, D) placeholders): codes (L, KVH, T_max, D) int8, scales (L, KVH, T_max) float32.
void DecodeStep::set_int8_cache(at::Tensor k_codes, at::Tensor v_codes, at::Tensor k_scale, at::Tensor v_scale) {
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(q_page_ == 0, "DecodeStep.set_int8_cache: Quest needs the float32 cache");
  for (const at::Tensor* c : {&k_codes, &v_codes})
    TORCH_CHECK(c->scalar_type() == at::kChar && c->is_contiguous() && c->dim() == 4 && c->size(0) == L_ &&
                    c->size(1) == KVH_ && c->size(3) == D_,
                "DecodeStep.set_int8_cache: codes must be contiguous int8 (L, KVH, T_max, D)");
  const int64_t T = k_codes.size(2);
  TORCH_CHECK(v_codes.size(2) == T, "DecodeStep.set_int8_cache: k and v codes differ in length");
  for (const at::Tensor* c : {&k_scale, &v_scale})
    TORCH_CHECK(c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 3 && c->size(0) == L_ &&
                    c->size(1) == KVH_ && c->size(2) == T,
                "DecodeStep.set_int8_cache: scales must be contiguous float32 (L, KVH, T_max)");
  kq_ = k_codes, vq_ = v_codes, ks_ = k_scale, vs_ = v_scale;
  int8_ = true;
  Tmax_ = T;
  scores_.assign(H_ * Tmax_, 0.0f);
}

}  // namespace sparseland
