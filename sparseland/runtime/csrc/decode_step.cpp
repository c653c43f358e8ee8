// Fused decode step (T == 1) for Llama-style models: every decoder layer in one call, no allocation.
//
// Per layer (the lean loop's Python step, generate.py, in the same order):
//   x = rmsnorm(h) ; q, k, v = Wq x, Wk x, Wv x ; [+ q/k/v biases (Qwen2) ; per-head rmsnorm of q and k
//   (Qwen3): set_layer_extras] ; RoPE(q, k) with the position's cos/sin ;
//   k, v -> cache[layer, :, pos] ; o = softmax(q K^T * scale) V over positions [0, pos] (GQA) ;
//   h += Wo o ; x = rmsnorm(h) ; h += Wd (silu(Wg x) * Wu x)
// Each W is a dense fp32/bf16 matrix, a bitmask or a 4-per-byte N:M format (matvec.h kernels), or,
// for activation sparsity (sparseland.activations), an actsparse / actsparse_bitmask format (W^T,
// actsparse_mv.h kernels: zero inputs skip their rows). Threshold sites as the hooks apply them:
//   input site on a Linear:  its input x -> x * (|x| > t) (t scalar or per channel), then its kernel
//                            runs over the nonzero inputs only;
//   gate_act site:           g = Wg x -> g * (|silu(g)| > t), so silu(g) * up is zero there and the
//                            rows of Wu for those channels are not computed (a row-format Wu).
// Activation-sparse kernels split output columns in blocks of 16 across threads (see Lin::run_act).
//
// Quest (set_quest; sparseland.attention.QuestConfig, methods.py is the reference): in layers >=
// dense_layers each query head attends only the keys of its top pages by the min/max upper bound of
// q . k, plus the partial last page; the page bounds are kept per layer and extended as pages fill.
// With refine > 1 the top ceil(refine * n_pages) pages are candidates and the best n_pages * page_size
// of their keys by exact q . k are attended. invalidate(pos) drops the bounds of pages at or after pos
// (the Python path rewrites the cache from pos: a prefill, a continuation).
//
// int8 KV cache (set_int8_cache; generate.py quantize_kv is the reference): K and V as int8 codes
// (L, KVH, T_max, D) with one float32 scale per (layer, KV head, position), scale = max|x| / 127 and
// codes = round_half_even(x / scale) (a zero vector: scale 0, codes 0); keys quantized after RoPE.
// Scores are scale_k[t] * (q . k_int8[t]) and the output sum_t p_t * scale_v[t] * v_int8[t], the
// codes widened to float in registers. Quest needs the float cache (set_quest refuses int8).
//
// Threading (torch.set_num_threads): mode 1 runs one OpenMP region for the whole step, every matvec's
// rows split statically across the threads with a barrier between dependent stages (~6 per layer);
// mode 0 wakes torch's pool once per matvec (parallel_rows), like the per-module Python path. With one
// thread both run serially.
#include <omp.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "actsparse_mv.h"
#include "common.h"
#include "matvec.h"
#include "qmatvec.h"
#include "qsparse.h"

namespace sparseland {
namespace {

enum Kind : int64_t { kDense = 0, kBitmask = 1, kNM4 = 2, kAct = 3, kActBitmask = 4, kQ4 = 5, kQ8 = 6, kQ4NM = 7,
                       kQ4Bitmask = 8 };

inline int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }
// A split boundary for the activation-sparse kernels: a multiple of 16, or the end. Every thread maps
// the same boundary to the same value, so the rounded ranges still tile [0, n).
inline int64_t align16(int64_t r, int64_t n) { return r >= n ? n : r & ~int64_t(15); }

// One Linear's active inputs (act_gather): indices and values.
struct ActIn {
  const int64_t* act = nullptr;
  const float* xa = nullptr;
  int64_t na = 0;
};

struct Lin {
  int64_t kind = kDense, in = 0, out = 0, in8 = 0;
  bool bf16 = false;
  const void* w = nullptr;  // dense weight, or packed values
  const uint8_t* mask = nullptr;
  const int64_t* row_ptr = nullptr;
  const float* thr = nullptr;  // (in,) input-site threshold (activation-sparse kinds), or none
  // quantized kinds (qmatvec.h): float16 scales / offsets (offset null: symmetric), columns per scale
  const at::Half* scale = nullptr;
  const at::Half* offset = nullptr;
  int64_t group = 0;

  bool act() const { return kind == kAct || kind == kActBitmask; }

  // rows [r0, r1) of a row-major kind (dense, bitmask, N:M) from the full input x
  void run(const float* x, float* y, int64_t r0, int64_t r1) const {
    if (r0 >= r1) return;
    if (kind == kDense) {
      if (bf16) dense_mv(static_cast<const at::BFloat16*>(w), x, y, in, r0, r1);
      else dense_mv(static_cast<const float*>(w), x, y, in, r0, r1);
    } else if (kind == kQ4) {
      q4_mv(static_cast<const uint8_t*>(w), scale, offset, in, group, x, y, r0, r1);
    } else if (kind == kQ8) {
      q8_mv(static_cast<const int8_t*>(w), scale, in, x, y, r0, r1);
    } else if (kind == kQ4NM) {
      q4nm_mv(mask, static_cast<const uint8_t*>(w), scale, offset, x, y, in, group, r0, r1);
    } else if (kind == kQ4Bitmask) {
      q4bitmask_mv(mask, row_ptr, static_cast<const uint8_t*>(w), scale, offset, x, y, in, group, r0, r1);
    } else if (kind == kBitmask) {
      if (bf16) bitmask_mv(mask, row_ptr, static_cast<const at::BFloat16*>(w), x, y, in8, r0, r1);
      else bitmask_mv(mask, row_ptr, static_cast<const float*>(w), x, y, in8, r0, r1);
    } else {
      if (bf16) nm4_mv(mask, static_cast<const at::BFloat16*>(w), x, y, in8, r0, r1);
      else nm4_mv(mask, static_cast<const float*>(w), x, y, in8, r0, r1);
    }
  }

  // outputs [align16(r0), align16(r1)) of an activation-sparse kind from its active inputs; acc: scratch
  void run_act(const ActIn& a, float* y, int64_t r0, int64_t r1, float* acc) const {
    r0 = align16(r0, out), r1 = align16(r1, out);
    if (r0 >= r1) return;
    if (kind == kAct) {
      if (bf16) actsparse_mv(static_cast<const at::BFloat16*>(w), a.act, a.xa, a.na, y, out, r0, r1);
      else actsparse_mv(static_cast<const float*>(w), a.act, a.xa, a.na, y, out, r0, r1);
    } else {
      if (bf16)
        actsparse_bitmask_mv(mask, row_ptr, static_cast<const at::BFloat16*>(w), a.act, a.xa, a.na, y, out, r0, r1,
                             acc);
      else actsparse_bitmask_mv(mask, row_ptr, static_cast<const float*>(w), a.act, a.xa, a.na, y, out, r0, r1, acc);
    }
  }
};

struct Layer {
  const float* ln1 = nullptr;
  const float* ln2 = nullptr;
  float eps1 = 0, eps2 = 0;
  Lin q, k, v, o, gate, up, down;
  const float* gate_thr = nullptr;  // (I,) gate_act site threshold on |silu(gate)|, or none
  bool act = false;                 // any activation-sparse kind or site in this layer
  // set_layer_extras (Qwen2 / Qwen3): q, k, v biases (H*D,), (KVH*D,), (KVH*D,) and per-head q / k
  // RMSNorm weights (D,) with their eps, each null when the layer has none
  const float *bq = nullptr, *bk = nullptr, *bv = nullptr, *qn = nullptr, *kn = nullptr;
  float qk_eps = 0;
};

// Per-thread scratch of the activation-sparse path: up to 3 active-input lists (q, k, v).
struct ActScratch {
  std::vector<int64_t> act[3];
  std::vector<float> xa[3];
};

// The calling thread's accumulator for actsparse_bitmask_mv (OpenMP region threads and torch's pool
// threads alike), at least n floats.
float* acc_buffer(int64_t n) {
  thread_local std::vector<float> acc;
  if ((int64_t)acc.size() < n) acc.resize(n);
  return acc.data();
}

// Who runs what: either all threads of one OpenMP region (region == true; each takes its static share
// of every split and waits at barriers), or the calling thread, which hands splits to parallel_rows.
struct Exec {
  bool region;
  int tid, nth;
  template <typename F>
  void split(int64_t n, const F& fn) const {  // fn(r0, r1) over [0, n), then all threads agree
    if (region) {
      fn(n * tid / nth, n * (tid + 1) / nth);
#pragma omp barrier
    } else {
      parallel_rows(n, 16, fn);
    }
  }
  template <typename F>
  void single(const F& fn) const {
    if (region) {
      if (tid == 0) fn();
#pragma omp barrier
    } else {
      fn();
    }
  }
};

// out = w * h / sqrt(mean(h^2) + eps), as LlamaRMSNorm in float32.
void rmsnorm(const float* h, const float* w, float eps, float* out, int64_t n) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(h[i]) * h[i];
  const float r = 1.0f / std::sqrt(float(ss / double(n)) + eps);
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (h[i] * r);
}

// Step 1b of a layer with extras: q, k, v += their biases; q and k heads RMS-normed per head (Qwen3).
void qkv_extras(const Layer& ly, float* q, float* k, float* v, int64_t H, int64_t KVH, int64_t D) {
  if (ly.bq != nullptr)
    for (int64_t i = 0; i < H * D; ++i) q[i] += ly.bq[i];
  if (ly.bk != nullptr)
    for (int64_t i = 0; i < KVH * D; ++i) k[i] += ly.bk[i];
  if (ly.bv != nullptr)
    for (int64_t i = 0; i < KVH * D; ++i) v[i] += ly.bv[i];
  if (ly.qn != nullptr)
    for (int64_t hh = 0; hh < H; ++hh) rmsnorm(q + hh * D, ly.qn, ly.qk_eps, q + hh * D, D);
  if (ly.kn != nullptr)
    for (int64_t kh = 0; kh < KVH; ++kh) rmsnorm(k + kh * D, ly.kn, ly.qk_eps, k + kh * D, D);
}

// In place: x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1).
void rope(float* x, const float* cos, const float* sin, int64_t D) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    x[i] = a * cos[i] - b * sin[i];
    x[i + h] = b * cos[i + h] + a * sin[i + h];
  }
}

// Quest's upper bound of q . k over a page: sum_d max(q_d mn_d, q_d mx_d).
float page_bound(const float* q, const float* mn, const float* mx, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 qv = _mm256_loadu_ps(q + i);
    acc = _mm256_add_ps(acc, _mm256_max_ps(_mm256_mul_ps(qv, _mm256_loadu_ps(mn + i)),
                                           _mm256_mul_ps(qv, _mm256_loadu_ps(mx + i))));
  }
  float s = hsum(acc);
  for (; i < n; ++i) s += std::max(q[i] * mn[i], q[i] * mx[i]);
  return s;
}

using Scored = std::pair<float, int32_t>;  // (score, page or position)
inline bool higher(const Scored& a, const Scored& b) { return a.first > b.first; }

float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float s = hsum(acc);
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

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

}  // namespace

class DecodeStep : public torch::CustomClassHolder {
 public:
  // tensors: per layer ln1 (C,), ln2 (C,), then q, k, v, o, gate, up, down, each as its format's tensors
  //   (dense: w; bitmask: mask, row_ptr, values; nm: mask, values; actsparse: wt (in, out);
  //   actsparse_bitmask: mask (in, ceil(out/8)), row_ptr, values) followed, if its input flag is set,
  //   by its input threshold (in,) float32; then, if the layer's gate flag is set, the gate_act
  //   threshold (I,) float32.
  // meta: L, C, I, H, KVH, D, then per layer 7 kinds (0 dense, 1 bitmask, 2 nm, 3 actsparse,
  //   4 actsparse_bitmask, 5 q4: codes, scale, offset (empty if symmetric), 6 q8: codes, scale, 7 q4_nm:
//   mask, codes, scale, offset, 8 q4_bitmask: mask, row_ptr, codes, scale, offset), 7
//   input-threshold flags (activation-sparse kinds only) and 1 gate flag.
  // feps: scale, then (eps1, eps2) per layer. k_cache / v_cache: (L, KVH, T_max, D) float32, written
  // at each position.
  DecodeStep(std::vector<at::Tensor> tensors, std::vector<int64_t> meta, std::vector<double> feps, at::Tensor k_cache,
             at::Tensor v_cache)
      : tensors_(std::move(tensors)), k_cache_(k_cache), v_cache_(v_cache) {
    TORCH_CHECK(meta.size() >= 6, "DecodeStep: meta must start with L, C, I, H, KVH, D");
    L_ = meta[0], C_ = meta[1], I_ = meta[2], H_ = meta[3], KVH_ = meta[4], D_ = meta[5];
    TORCH_CHECK(L_ > 0 && C_ > 0 && I_ > 0 && H_ > 0 && KVH_ > 0 && D_ > 0 && D_ % 2 == 0 && H_ % KVH_ == 0,
                "DecodeStep: bad dimensions");
    TORCH_CHECK((int64_t)meta.size() == 6 + 15 * L_,
                "DecodeStep: meta needs 15 entries per layer (7 kinds, 7 input-threshold flags, a gate flag)");
    TORCH_CHECK((int64_t)feps.size() == 1 + 2 * L_, "DecodeStep: feps needs scale and 2 eps per layer");
    for (const at::Tensor* c : {&k_cache_, &v_cache_})
      TORCH_CHECK(c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 4 && c->size(0) == L_ &&
                      c->size(1) == KVH_ && c->size(3) == D_,
                  "DecodeStep: caches must be contiguous float32 (L, KVH, T_max, D)");
    Tmax_ = k_cache_.size(2);
    TORCH_CHECK(v_cache_.size(2) == Tmax_, "DecodeStep: k and v caches differ in length");
    scale_ = float(feps[0]);
    size_t t = 0;
    auto next = [&]() -> const at::Tensor& {
      TORCH_CHECK(t < tensors_.size(), "DecodeStep: too few tensors for the formats in meta");
      return tensors_[t++];
    };
    auto norm = [&](int64_t n) {
      const at::Tensor& w = next();
      TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.numel() == n,
                  "DecodeStep: norm weights must be contiguous float32 (C,)");
      return w.data_ptr<float>();
    };
    const int64_t shapes[7][2] = {{H_ * D_, C_}, {KVH_ * D_, C_}, {KVH_ * D_, C_}, {C_, H_ * D_},
                                  {I_, C_},      {I_, C_},        {C_, I_}};
    layers_.resize(L_);
    for (int64_t l = 0; l < L_; ++l) {
      Layer& ly = layers_[l];
      ly.ln1 = norm(C_);
      ly.ln2 = norm(C_);
      ly.eps1 = float(feps[1 + 2 * l]);
      ly.eps2 = float(feps[2 + 2 * l]);
      Lin* lins[7] = {&ly.q, &ly.k, &ly.v, &ly.o, &ly.gate, &ly.up, &ly.down};
      const int64_t* lm = meta.data() + 6 + 15 * l;  // this layer's kinds, input flags, gate flag
      auto threshold = [&](int64_t n, const char* what) {
        const at::Tensor& t = next();
        TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, "DecodeStep: layer ", l,
                    ": ", what, " threshold must be contiguous float32 with ", n, " elements");
        return t.data_ptr<float>();
      };
      for (int j = 0; j < 7; ++j) {
        Lin& lin = *lins[j];
        lin.kind = lm[j];
        lin.out = shapes[j][0];
        lin.in = shapes[j][1];
        lin.in8 = (lin.in + 7) / 8;
        if (lin.kind == kDense) {
          const at::Tensor& w = next();
          TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == lin.out && w.size(1) == lin.in,
                      "DecodeStep: layer ", l, " linear ", j, ": dense weight must be contiguous (", lin.out, ", ",
                      lin.in, ")");
          set_values(lin, w);
        } else if (lin.kind == kBitmask || lin.kind == kNM4) {
          const at::Tensor& m = next();
          TORCH_CHECK(m.scalar_type() == at::kByte && m.is_contiguous() && m.dim() == 2 && m.size(0) == lin.out &&
                          m.size(1) == lin.in8,
                      "DecodeStep: layer ", l, " linear ", j, ": mask must be contiguous uint8 (out, ceil(in/8))");
          lin.mask = m.data_ptr<uint8_t>();
          if (lin.kind == kBitmask) {
            const at::Tensor& rp = next();
            TORCH_CHECK(rp.scalar_type() == at::kLong && rp.is_contiguous() && rp.numel() == lin.out + 1,
                        "DecodeStep: bitmask row_ptr must be int64 (out + 1,)");
            lin.row_ptr = rp.data_ptr<int64_t>();
            const at::Tensor& v = next();
            TORCH_CHECK(v.numel() >= rp[lin.out].item<int64_t>() + 8, "DecodeStep: values need 8 zeros of padding");
            set_values(lin, v);
          } else {
            const at::Tensor& v = next();
            TORCH_CHECK(v.numel() >= lin.out * lin.in8 * 4 + 8, "DecodeStep: N:M values too short");
            set_values(lin, v);
          }
        } else if (lin.kind == kAct) {
          const at::Tensor& w = next();
          TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == lin.in && w.size(1) == lin.out,
                      "DecodeStep: layer ", l, " linear ", j, ": actsparse weight must be contiguous W^T (", lin.in,
                      ", ", lin.out, ")");
          set_values(lin, w);
        } else if (lin.kind == kActBitmask) {
          const int64_t out8 = (lin.out + 7) / 8;
          const at::Tensor& m = next();
          TORCH_CHECK(m.scalar_type() == at::kByte && m.is_contiguous() && m.dim() == 2 && m.size(0) == lin.in &&
                          m.size(1) == out8,
                      "DecodeStep: layer ", l, " linear ", j, ": mask must be contiguous uint8 (in, ceil(out/8))");
          lin.mask = m.data_ptr<uint8_t>();
          const at::Tensor& rp = next();
          TORCH_CHECK(rp.scalar_type() == at::kLong && rp.is_contiguous() && rp.numel() == lin.in + 1,
                      "DecodeStep: actsparse_bitmask row_ptr must be int64 (in + 1,)");
          lin.row_ptr = rp.data_ptr<int64_t>();
          const at::Tensor& v = next();
          TORCH_CHECK(v.dim() == 1 && v.numel() >= rp[lin.in].item<int64_t>() + 8,
                      "DecodeStep: values need 8 zeros of padding");
          set_values(lin, v);
        } else if (lin.kind == kQ4 || lin.kind == kQ8) {
          const at::Tensor& codes = next();  // one at a time: argument evaluation order is unspecified
          const at::Tensor& scale = next();
          const at::Tensor* offset = lin.kind == kQ4 ? &next() : nullptr;
          set_quant(lin, codes, scale, offset, l, j);
        } else if (lin.kind == kQ4NM || lin.kind == kQ4Bitmask) {
          // mask, [row_ptr], codes, scale, offset: checked by building the same op-level views (qsparse.py
          // checks them when the format is made; here the shapes that bound every read)
          const at::Tensor& m = next();
          TORCH_CHECK(m.scalar_type() == at::kByte && m.is_contiguous() && m.dim() == 2 && m.size(0) == lin.out &&
                          m.size(1) * 8 == lin.in && lin.in % 32 == 0,
                      "DecodeStep: layer ", l, " linear ", j, ": q4 sparse mask must be contiguous uint8 (out, in/8)");
          lin.mask = m.data_ptr<uint8_t>();
          const at::Tensor* rp = lin.kind == kQ4Bitmask ? &next() : nullptr;
          const at::Tensor& codes = next();
          const at::Tensor& scale = next();
          const at::Tensor& offset = next();
          TORCH_CHECK(codes.scalar_type() == at::kByte && codes.is_contiguous(), "DecodeStep: q4 codes must be uint8");
          if (rp != nullptr) {
            TORCH_CHECK(rp->scalar_type() == at::kLong && rp->is_contiguous() && rp->numel() == lin.out + 1 &&
                            (*rp)[lin.out].item<int64_t>() <= codes.numel(),
                        "DecodeStep: q4_bitmask row_ptr must be int64 (out + 1,) within the codes");
            lin.row_ptr = rp->data_ptr<int64_t>();
          } else {
            TORCH_CHECK(codes.numel() == lin.out * lin.in / 4, "DecodeStep: q4_nm codes must be (out, in/4)");
          }
          TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                          scale.size(0) == lin.out && scale.size(1) > 0 && lin.in % scale.size(1) == 0,
                      "DecodeStep: q4 sparse scale must be float16 (out, in / group)");
          lin.group = lin.in / scale.size(1);
          TORCH_CHECK(lin.group % 32 == 0 && lin.group <= 128, "DecodeStep: q4 group must be 32, 64 or 128");
          lin.w = codes.data_ptr();
          lin.scale = scale.data_ptr<at::Half>();
          if (offset.numel() > 0) {
            TORCH_CHECK(offset.scalar_type() == at::kHalf && offset.is_contiguous() && offset.sizes() == scale.sizes(),
                        "DecodeStep: q4 sparse offset must be float16 shaped like scale");
            lin.offset = offset.data_ptr<at::Half>();
          }
        } else {
          TORCH_CHECK(false, "DecodeStep: unknown weight kind ", lin.kind);
        }
        if (lm[7 + j]) {
          TORCH_CHECK(lin.act(), "DecodeStep: layer ", l, " linear ", j,
                      ": an input threshold needs an activation-sparse kind (3 or 4)");
          lin.thr = threshold(lin.in, "input");
        }
        ly.act = ly.act || lin.act();
      }
      if (lm[14]) {
        ly.gate_thr = threshold(I_, "gate_act");
        ly.act = true;
      }
      any_act_ = any_act_ || ly.act;
    }
    TORCH_CHECK(t == tensors_.size(), "DecodeStep: more tensors than the formats in meta use");
    const int64_t maxw = pad8(std::max({C_, I_, H_ * D_})) + 8;
    qkv_.assign(pad8(H_ * D_ + 2 * KVH_ * D_) + 8, 0.0f);
    att_.assign(pad8(H_ * D_) + 8, 0.0f);
    tmp_.assign(maxw, 0.0f);
    gate_.assign(pad8(I_) + 8, 0.0f);
    up_.assign(pad8(I_) + 8, 0.0f);
    act_.assign(pad8(I_) + 8, 0.0f);
    scores_.assign(H_ * Tmax_, 0.0f);
    acc_n_ = maxw + 32;
  }

  // h (C,) float32, the embedded token, overwritten with the last layer's output and returned; cos, sin
  // (D,) for position `pos`; mode 1: one OpenMP region for the step, 0: torch's pool per matvec.
  at::Tensor step(at::Tensor h, at::Tensor cos, at::Tensor sin, int64_t pos, int64_t mode) {
    TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == C_,
                "DecodeStep.step: h must be contiguous float32 with ", C_, " elements");
    TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                    sin.is_contiguous() && cos.numel() == D_ && sin.numel() == D_,
                "DecodeStep.step: cos and sin must be contiguous float32 (D,) = (", D_, ",)");
    TORCH_CHECK(pos >= 0 && pos < Tmax_, "DecodeStep.step: position ", pos, " is outside the cache (", Tmax_, ")");
    float* H = h.data_ptr<float>();
    const float* c = cos.data_ptr<float>();
    const float* s = sin.data_ptr<float>();
    const int nt = int(at::get_num_threads());
    if (mode == 1 && nt > 1) {
      if ((int64_t)xn_.size() < nt) xn_.resize(nt);
      for (auto& b : xn_)
        if (b.empty()) b.assign(pad8(C_) + 8, 0.0f);
      if (any_act_) act_scratch(nt);
#pragma omp parallel num_threads(nt)
      {
        Exec ex{true, omp_get_thread_num(), omp_get_num_threads()};
        run(ex, H, c, s, pos);
      }
    } else {
      if (xn_.empty()) xn_.resize(1);
      if (xn_[0].empty()) xn_[0].assign(pad8(C_) + 8, 0.0f);
      if (any_act_) act_scratch(1);
      run(Exec{false, 0, 1}, H, c, s, pos);
    }
    return h;
  }

  int64_t num_layers() const { return L_; }

  // Layer l's q/k/v biases and per-head q/k norm weights (empty tensors: none), kept alive here.
  void set_layer_extras(int64_t l, at::Tensor bq, at::Tensor bk, at::Tensor bv, at::Tensor qn, at::Tensor kn,
                        double eps) {
    TORCH_CHECK(l >= 0 && l < L_, "DecodeStep.set_layer_extras: layer ", l, " is outside [0, ", L_, ")");
    Layer& ly = layers_[l];
    auto take = [&](const at::Tensor& t, int64_t n, const char* what) -> const float* {
      if (t.numel() == 0) return nullptr;
      TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
                  "DecodeStep.set_layer_extras: ", what, " must be contiguous float32 with ", n, " elements");
      extras_.push_back(t);
      return t.data_ptr<float>();
    };
    ly.bq = take(bq, H_ * D_, "q bias");
    ly.bk = take(bk, KVH_ * D_, "k bias");
    ly.bv = take(bv, KVH_ * D_, "v bias");
    ly.qn = take(qn, D_, "q norm weight");
    ly.kn = take(kn, D_, "k norm weight");
    ly.qk_eps = float(eps);
  }

  // Run on an int8 KV cache instead of the float one (the constructor's float caches are then unused,
  // e.g. (L, KVH, 0, D) placeholders): codes (L, KVH, T_max, D) int8, scales (L, KVH, T_max) float32.
  void set_int8_cache(at::Tensor k_codes, at::Tensor v_codes, at::Tensor k_scale, at::Tensor v_scale) {
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

  // Quest in layers >= dense_layers (see the header); page_size 0 turns it off (dense attention).
  void set_quest(int64_t page_size, double keep, int64_t dense_layers, double refine) {
    TORCH_CHECK(page_size >= 0 && keep > 0 && keep <= 1 && dense_layers >= 0 && refine >= 1,
                "DecodeStep.set_quest: page_size >= 0, keep in (0, 1], dense_layers >= 0, refine >= 1");
    TORCH_CHECK(page_size == 0 || !int8_, "DecodeStep.set_quest: Quest needs the float32 cache, not int8");
    q_page_ = page_size, q_keep_ = keep, q_dense_ = dense_layers, q_refine_ = refine;
    if (page_size == 0) return;
    Pmax_ = Tmax_ / page_size;
    kmin_.assign(L_ * KVH_ * std::max<int64_t>(Pmax_, 1) * D_, 0.0f);
    kmax_.assign(kmin_.size(), 0.0f);
    pages_done_.assign(L_, 0);
    cand_.resize(H_ * Tmax_);
    tok_.resize(H_ * Tmax_);
  }

  // The cache is rewritten from position pos on: forget the bounds of the pages that hold it.
  void invalidate(int64_t pos) {
    if (q_page_ == 0) return;
    for (auto& d : pages_done_) d = std::min(d, std::max<int64_t>(pos, 0) / q_page_);
  }

 private:
  void act_scratch(int nt) {  // per-thread buffers of the activation-sparse path, allocated once
    if ((int64_t)scratch_.size() >= nt) return;
    const int64_t maxw = pad8(std::max({C_, I_, H_ * D_})) + 16;
    scratch_.resize(nt);
    for (auto& sc : scratch_)
      for (int j = 0; j < 3; ++j) sc.act[j].resize(maxw), sc.xa[j].resize(maxw);
    keep_.assign(I_, 0);
  }

  // Element-wise min / max of layer l's keys over each page completed since the last call.
  void page_bounds(int64_t l, const float* kc, int64_t p1) {
    const int64_t full = std::min(p1 / q_page_, Pmax_);
    for (int64_t p = pages_done_[l]; p < full; ++p)
      for (int64_t kh = 0; kh < KVH_; ++kh) {
        float* mn = kmin_.data() + ((l * KVH_ + kh) * Pmax_ + p) * D_;
        float* mx = kmax_.data() + ((l * KVH_ + kh) * Pmax_ + p) * D_;
        const float* K = kc + (kh * Tmax_ + p * q_page_) * D_;
        std::copy(K, K + D_, mn);
        std::copy(K, K + D_, mx);
        for (int64_t t = 1; t < q_page_; ++t)
          for (int64_t d = 0; d < D_; ++d) {
            mn[d] = std::min(mn[d], K[t * D_ + d]);
            mx[d] = std::max(mx[d], K[t * D_ + d]);
          }
      }
    pages_done_[l] = std::max(pages_done_[l], full);
  }

  // Query head hh of layer l over positions [0, p1) with Quest's selection (methods.py: _decode with
  // decode.quest_select / quest_refine_select); writes its output o (D,).
  void quest_head(int64_t l, int64_t hh, const float* qh, const float* K, const float* V, int64_t p1, float* o) {
    const int64_t kh = hh / (H_ / KVH_), ps = q_page_, P = p1 / ps;
    const int64_t n_pages = std::min(P, int64_t(std::ceil(q_keep_ * double(p1) / double(ps) - 1e-9)));
    const int64_t n_cand =
        q_refine_ > 1 ? std::min(P, int64_t(std::ceil(q_refine_ * double(n_pages) - 1e-9))) : n_pages;
    Scored* cand = cand_.data() + hh * Tmax_;
    Scored* tok = tok_.data() + hh * Tmax_;
    const float* mn = kmin_.data() + (l * KVH_ + kh) * Pmax_ * D_;
    const float* mx = kmax_.data() + (l * KVH_ + kh) * Pmax_ * D_;
    for (int64_t p = 0; p < P; ++p) cand[p] = {page_bound(qh, mn + p * D_, mx + p * D_, D_), int32_t(p)};
    if (n_cand < P) std::nth_element(cand, cand + n_cand, cand + P, higher);
    int64_t n = 0;
    for (int64_t i = 0; i < n_cand; ++i)
      for (int64_t t = cand[i].second * ps, e = t + ps; t < e; ++t) tok[n++] = {dot(qh, K + t * D_, D_), int32_t(t)};
    const int64_t keep = n_pages * ps;
    if (keep < n) std::nth_element(tok, tok + keep, tok + n, higher), n = keep;
    for (int64_t t = P * ps; t < p1; ++t) tok[n++] = {dot(qh, K + t * D_, D_), int32_t(t)};  // the partial page
    float m = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, tok[i].first *= scale_);
    float sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += tok[i].first = std::exp(tok[i].first - m);
    std::fill(o, o + D_, 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float p = tok[i].first / sum;
      const float* vt = V + int64_t(tok[i].second) * D_;
      for (int64_t d = 0; d < D_; ++d) o[d] += p * vt[d];
    }
  }

  // The active inputs of lin from x (its input site's rule), into list j of sc.
  static ActIn gather(const Lin& lin, const float* x, ActScratch& sc, int j) {
    return ActIn{sc.act[j].data(), sc.xa[j].data(), act_gather(x, lin.thr, lin.in, sc.act[j].data(), sc.xa[j].data())};
  }

  // A quantized kind's codes, scales and (q4) offsets, checked against the layer's shape (qmatvec.h).
  static void set_quant(Lin& lin, const at::Tensor& codes, const at::Tensor& scale, const at::Tensor* offset, int64_t l,
                        int j) {
    const bool q4 = lin.kind == kQ4;
    TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                    scale.size(0) == lin.out && scale.size(1) > 0 && lin.in % scale.size(1) == 0,
                "DecodeStep: layer ", l, " linear ", j, ": scale must be contiguous float16 (out, in / group)");
    lin.group = lin.in / scale.size(1);
    TORCH_CHECK(!q4 || (lin.group % 32 == 0 && lin.group <= 128), "DecodeStep: q4 group must be 32, 64 or 128");
    TORCH_CHECK(q4 || scale.size(1) == 1, "DecodeStep: q8 needs one scale per row");
    TORCH_CHECK(codes.is_contiguous() && codes.dim() == 2 && codes.size(0) == lin.out &&
                    codes.size(1) == (q4 ? lin.in / 2 : lin.in) &&
                    codes.scalar_type() == (q4 ? at::kByte : at::kChar),
                "DecodeStep: layer ", l, " linear ", j, ": codes must be contiguous ", q4 ? "uint8 (out, in/2)" :
                "int8 (out, in)");
    lin.w = codes.data_ptr();
    lin.scale = scale.data_ptr<at::Half>();
    if (offset != nullptr && offset->numel() > 0) {
      TORCH_CHECK(offset->scalar_type() == at::kHalf && offset->is_contiguous() && offset->sizes() == scale.sizes(),
                  "DecodeStep: layer ", l, " linear ", j, ": offset must be float16 shaped like scale");
      lin.offset = offset->data_ptr<at::Half>();
    }
  }

  static void set_values(Lin& lin, const at::Tensor& v) {
    TORCH_CHECK(v.is_contiguous(), "DecodeStep: weight values must be contiguous");
    if (v.scalar_type() == at::kFloat) lin.w = v.data_ptr<float>(), lin.bf16 = false;
    else if (v.scalar_type() == at::kBFloat16) lin.w = v.data_ptr<at::BFloat16>(), lin.bf16 = true;
    else TORCH_CHECK(false, "DecodeStep: weight values must be float32 or bfloat16");
  }

  // Step 5 of an activation-sparse layer: act = silu(g) * up over row blocks aligned to 16, where g is
  // gated by the gate_act site (kept: |silu(g)| > t); up is computed only for kept rows.
  void mlp_act(const Exec& ex, const Layer& ly, const float* xn) {
    ActScratch& sc = scratch_[ex.region ? ex.tid : 0];
    ActIn ag, au;
    if (ly.gate.act()) ag = gather(ly.gate, xn, sc, 0);
    if (ly.up.act()) au = ly.gate.act() && ly.gate.thr == ly.up.thr ? ag : gather(ly.up, xn, sc, 1);
    float* G = gate_.data();
    float* U = up_.data();
    float* A = act_.data();
    uint8_t* keep = keep_.data();
    ex.split(I_, [&](int64_t r0, int64_t r1) {
      r0 = align16(r0, I_), r1 = align16(r1, I_);
      if (r0 >= r1) return;
      float* acc = acc_buffer(acc_n_);
      if (ly.gate.act()) ly.gate.run_act(ag, G, r0, r1, acc);
      else ly.gate.run(xn, G, r0, r1);
      if (ly.gate_thr == nullptr) {
        if (ly.up.act()) ly.up.run_act(au, U, r0, r1, acc);
        else ly.up.run(xn, U, r0, r1);
        for (int64_t r = r0; r < r1; ++r) {
          const float g = G[r];
          A[r] = g / (1.0f + std::exp(-g)) * U[r];
        }
        return;
      }
      for (int64_t r = r0; r < r1; ++r) {  // the gate_act site: A = silu(g) where kept
        const float g = G[r];
        const float sg = g / (1.0f + std::exp(-g));
        keep[r] = std::fabs(sg) > ly.gate_thr[r];
        A[r] = sg;
      }
      if (ly.up.act()) {
        ly.up.run_act(au, U, r0, r1, acc);
      } else {
        for (int64_t r = r0; r < r1;) {  // runs of kept rows
          if (!keep[r]) {
            ++r;
            continue;
          }
          int64_t e = r + 1;
          while (e < r1 && keep[e]) ++e;
          ly.up.run(xn, U, r, e);
          r = e;
        }
      }
      for (int64_t r = r0; r < r1; ++r) A[r] = keep[r] ? A[r] * U[r] : 0.0f;
    });
  }

  // Step 3 on the int8 cache: each query head of layer l over positions [0, p1), into att_.
  void attend_int8(const Exec& ex, int64_t l, const float* q, int64_t p1) {
    const int64_t G = H_ / KVH_;
    ex.split(H_, [&](int64_t h0, int64_t h1) {
      for (int64_t hh = h0; hh < h1; ++hh) {
        const int64_t row = l * KVH_ * Tmax_ + (hh / G) * Tmax_;  // (layer, kv head) row of the scales
        const float* qh = q + hh * D_;
        const int8_t* K = kq_.data_ptr<int8_t>() + row * D_;
        const int8_t* V = vq_.data_ptr<int8_t>() + row * D_;
        const float* Ks = ks_.data_ptr<float>() + row;
        const float* Vs = vs_.data_ptr<float>() + row;
        float* sc = scores_.data() + hh * Tmax_;
        float m = -std::numeric_limits<float>::infinity();
        if (D_ == 64) m = scores_i8<8>(qh, K, Ks, scale_, p1, sc);
        else if (D_ == 128) m = scores_i8<16>(qh, K, Ks, scale_, p1, sc);
        else if (D_ == 32) m = scores_i8<4>(qh, K, Ks, scale_, p1, sc);
        else
          for (int64_t t = 0; t < p1; ++t) m = std::max(m, sc[t] = Ks[t] * dot_i8(qh, K + t * D_, D_) * scale_);
        float sum = 0;
        for (int64_t t = 0; t < p1; ++t) sum += sc[t] = std::exp(sc[t] - m);
        float* o = att_.data() + hh * D_;
        const float inv = 1.0f / sum;
        for (int64_t t = 0; t < p1; ++t) sc[t] *= inv * Vs[t];  // p_t * scale_v[t]
        if (D_ == 64) weighted_sum_i8<8>(sc, V, p1, o);
        else if (D_ == 128) weighted_sum_i8<16>(sc, V, p1, o);
        else if (D_ == 32) weighted_sum_i8<4>(sc, V, p1, o);
        else {
          std::fill(o, o + D_, 0.0f);
          for (int64_t t = 0; t < p1; ++t) axpy_i8(sc[t], V + t * D_, o, D_);
        }
      }
    });
  }

  void run(const Exec& ex, float* H, const float* cos, const float* sin, int64_t pos) {
    const int64_t HD = H_ * D_, KD = KVH_ * D_, G = H_ / KVH_, p1 = pos + 1;
    float* xn = xn_[ex.region ? ex.tid : 0].data();  // each thread normalizes h into its own copy
    float* q = qkv_.data();
    float* k = q + HD;
    float* v = k + KD;
    for (int64_t l = 0; l < L_; ++l) {
      const Layer& ly = layers_[l];
      float* kc = int8_ ? nullptr : k_cache_.data_ptr<float>() + l * KVH_ * Tmax_ * D_;  // (KVH, T_max, D)
      float* vc = int8_ ? nullptr : v_cache_.data_ptr<float>() + l * KVH_ * Tmax_ * D_;
      // Step 1: rmsnorm, then q, k, v as one row space [q | k | v]
      rmsnorm(H, ly.ln1, ly.eps1, xn, C_);
      if (!ly.act) {
        ex.split(HD + 2 * KD, [&](int64_t r0, int64_t r1) {
          ly.q.run(xn, q, std::min(r0, HD), std::min(r1, HD));
          ly.k.run(xn, k, std::clamp(r0 - HD, int64_t(0), KD), std::clamp(r1 - HD, int64_t(0), KD));
          ly.v.run(xn, v, std::clamp(r0 - HD - KD, int64_t(0), KD), std::clamp(r1 - HD - KD, int64_t(0), KD));
        });
      } else {  // the same row space; activation-sparse ones from their active inputs (shared if equal rules)
        ActScratch& sc = scratch_[ex.region ? ex.tid : 0];
        const Lin* lins[3] = {&ly.q, &ly.k, &ly.v};
        float* outs[3] = {q, k, v};
        const int64_t offs[3] = {0, HD, HD + KD}, ns[3] = {HD, KD, KD};
        ActIn in[3];
        for (int j = 0; j < 3; ++j) {
          if (!lins[j]->act()) continue;
          int same = -1;
          for (int i = 0; i < j; ++i)
            if (lins[i]->act() && lins[i]->thr == lins[j]->thr) same = i;
          in[j] = same >= 0 ? in[same] : gather(*lins[j], xn, sc, j);
        }
        ex.split(HD + 2 * KD, [&](int64_t r0, int64_t r1) {
          for (int j = 0; j < 3; ++j) {
            const int64_t a = std::clamp(r0 - offs[j], int64_t(0), ns[j]), b = std::clamp(r1 - offs[j], int64_t(0), ns[j]);
            if (lins[j]->act()) lins[j]->run_act(in[j], outs[j], a, b, acc_buffer(acc_n_));
            else lins[j]->run(xn, outs[j], a, b);
          }
        });
      }
      // Step 2: RoPE on q and k; k, v into the cache at pos
      if (int8_) {
        ex.single([&] {
          qkv_extras(ly, q, k, v, H_, KVH_, D_);
          for (int64_t hh = 0; hh < H_; ++hh) rope(q + hh * D_, cos, sin, D_);
          const int64_t base = l * KVH_ * Tmax_;  // (KVH, T_max) of layer l
          for (int64_t kh = 0; kh < KVH_; ++kh) {
            rope(k + kh * D_, cos, sin, D_);
            const int64_t at = base + kh * Tmax_ + pos;
            ks_.data_ptr<float>()[at] = quantize_i8(k + kh * D_, kq_.data_ptr<int8_t>() + at * D_, D_);
            vs_.data_ptr<float>()[at] = quantize_i8(v + kh * D_, vq_.data_ptr<int8_t>() + at * D_, D_);
          }
        });
        attend_int8(ex, l, q, p1);
      } else {
      ex.single([&] {
        qkv_extras(ly, q, k, v, H_, KVH_, D_);
        for (int64_t hh = 0; hh < H_; ++hh) rope(q + hh * D_, cos, sin, D_);
        for (int64_t kh = 0; kh < KVH_; ++kh) {
          rope(k + kh * D_, cos, sin, D_);
          std::copy(k + kh * D_, k + (kh + 1) * D_, kc + (kh * Tmax_ + pos) * D_);
          std::copy(v + kh * D_, v + (kh + 1) * D_, vc + (kh * Tmax_ + pos) * D_);
        }
        if (q_page_ > 0 && l >= q_dense_) page_bounds(l, kc, p1);
      });
      // Step 3: attention, one query head at a time over positions [0, pos]
      ex.split(H_, [&](int64_t h0, int64_t h1) {
        for (int64_t hh = h0; hh < h1; ++hh) {
          const int64_t kh = hh / G;
          const float* qh = q + hh * D_;
          const float* K = kc + kh * Tmax_ * D_;
          const float* V = vc + kh * Tmax_ * D_;
          if (q_page_ > 0 && l >= q_dense_) {
            quest_head(l, hh, qh, K, V, p1, att_.data() + hh * D_);
            continue;
          }
          float* sc = scores_.data() + hh * Tmax_;
          float m = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < p1; ++t) m = std::max(m, sc[t] = dot(qh, K + t * D_, D_) * scale_);
          float sum = 0;
          for (int64_t t = 0; t < p1; ++t) sum += sc[t] = std::exp(sc[t] - m);
          float* o = att_.data() + hh * D_;
          std::fill(o, o + D_, 0.0f);
          for (int64_t t = 0; t < p1; ++t) {
            const float p = sc[t] / sum;
            const float* vt = V + t * D_;
            for (int64_t d = 0; d < D_; ++d) o[d] += p * vt[d];
          }
        }
      });
      }
      // Step 4: h += Wo o (each thread adds its own rows)
      if (!ly.o.act()) {
        ex.split(C_, [&](int64_t r0, int64_t r1) {
          ly.o.run(att_.data(), tmp_.data(), r0, r1);
          for (int64_t r = r0; r < r1; ++r) H[r] += tmp_[r];
        });
      } else {
        const ActIn a = gather(ly.o, att_.data(), scratch_[ex.region ? ex.tid : 0], 0);
        ex.split(C_, [&](int64_t r0, int64_t r1) {
          ly.o.run_act(a, tmp_.data(), r0, r1, acc_buffer(acc_n_));
          for (int64_t r = align16(r0, C_); r < align16(r1, C_); ++r) H[r] += tmp_[r];
        });
      }
      // Step 5: MLP: act = silu(Wg x) * (Wu x), row blocks of both
      rmsnorm(H, ly.ln2, ly.eps2, xn, C_);
      if (!ly.act) {
        ex.split(I_, [&](int64_t r0, int64_t r1) {
          ly.gate.run(xn, gate_.data(), r0, r1);
          ly.up.run(xn, up_.data(), r0, r1);
          for (int64_t r = r0; r < r1; ++r) {
            const float g = gate_[r];
            act_[r] = g / (1.0f + std::exp(-g)) * up_[r];
          }
        });
      } else {
        mlp_act(ex, ly, xn);
      }
      // Step 6: h += Wd act
      if (!ly.down.act()) {
        ex.split(C_, [&](int64_t r0, int64_t r1) {
          ly.down.run(act_.data(), tmp_.data(), r0, r1);
          for (int64_t r = r0; r < r1; ++r) H[r] += tmp_[r];
        });
      } else {
        const ActIn a = gather(ly.down, act_.data(), scratch_[ex.region ? ex.tid : 0], 0);
        ex.split(C_, [&](int64_t r0, int64_t r1) {
          ly.down.run_act(a, tmp_.data(), r0, r1, acc_buffer(acc_n_));
          for (int64_t r = align16(r0, C_); r < align16(r1, C_); ++r) H[r] += tmp_[r];
        });
      }
    }
  }

  std::vector<at::Tensor> tensors_;  // keeps every weight alive
  std::vector<at::Tensor> extras_;   // and the layers' biases / q-k norm weights
  at::Tensor k_cache_, v_cache_;
  // int8 KV cache (set_int8_cache): codes (L, KVH, T_max, D) and scales (L, KVH, T_max)
  bool int8_ = false;
  at::Tensor kq_, vq_, ks_, vs_;
  std::vector<Layer> layers_;
  int64_t L_ = 0, C_ = 0, I_ = 0, H_ = 0, KVH_ = 0, D_ = 0, Tmax_ = 0;
  float scale_ = 1.0f;
  std::vector<std::vector<float>> xn_;
  std::vector<float> qkv_, att_, tmp_, gate_, up_, act_, scores_;
  // activation sparsity: whether any layer has it, per-thread active-input lists, gate_act keep flags,
  // accumulator size for actsparse_bitmask_mv
  bool any_act_ = false;
  std::vector<ActScratch> scratch_;
  std::vector<uint8_t> keep_;
  int64_t acc_n_ = 0;
  // Quest: page size (0: off), budget, dense layers, refine; page bounds (L, KVH, Pmax, D) and how many
  // pages of each layer they hold; per-head scratch (H, T_max) of scored pages and positions
  int64_t q_page_ = 0, q_dense_ = 0, Pmax_ = 0;
  double q_keep_ = 1.0, q_refine_ = 1.0;
  std::vector<float> kmin_, kmax_;
  std::vector<int64_t> pages_done_;
  std::vector<Scored> cand_, tok_;
};

}  // namespace sparseland

TORCH_LIBRARY_FRAGMENT(sparseland, m) {
  m.class_<sparseland::DecodeStep>("DecodeStep")
      .def(torch::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<double>, at::Tensor, at::Tensor>())
      .def("step", &sparseland::DecodeStep::step)
      .def("num_layers", &sparseland::DecodeStep::num_layers)
      .def("set_layer_extras", &sparseland::DecodeStep::set_layer_extras)
      .def("set_quest", &sparseland::DecodeStep::set_quest)
      .def("invalidate", &sparseland::DecodeStep::invalidate)
      .def("set_int8_cache", &sparseland::DecodeStep::set_int8_cache);
}
