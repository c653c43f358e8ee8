// Quest inside the fused decode step (set_quest; sparseland.attention.QuestConfig, methods.py is the
// reference): in layers >= dense_layers each query head attends only the keys of its top pages by the
// min/max upper bound of q . k, plus the partial last page; the page bounds are kept per layer and
// extended as pages fill. With refine > 1 the top ceil(refine * n_pages) pages are candidates and the
// best n_pages * page_size of their keys by exact q . k are attended. invalidate(pos) drops the bounds
// of pages at or after pos (the Python path rewrites the cache from pos: a prefill, a continuation).
#include <algorithm>
#include <cmath>
#include <limits>

#include "decode_step.h"

namespace sparseland {
namespace decode {
namespace {

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

inline bool higher(const Scored& a, const Scored& b) { return a.first > b.first; }

}  // namespace
}  // namespace decode

using namespace decode;

// Quest in layers >= dense_layers; page_size 0 turns it off (dense attention).
void DecodeStep::set_quest(int64_t page_size, double keep, int64_t dense_layers, double refine) {
  std::lock_guard<std::mutex> lock(mu_);
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
void DecodeStep::invalidate(int64_t pos) {
  std::lock_guard<std::mutex> lock(mu_);
  if (q_page_ == 0) return;
  for (auto& d : pages_done_) d = std::min(d, std::max<int64_t>(pos, 0) / q_page_);
}

// Element-wise min / max of layer l's keys over each page completed since the last call.
void DecodeStep::page_bounds(int64_t l, const float* kc, int64_t p1) {
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
void DecodeStep::quest_head(int64_t l, int64_t hh, const float* qh, const float* K, const float* V, int64_t p1,
                            float* o) {
  const int64_t kh = hh / (H_ / KVH_), ps = q_page_, P = p1 / ps;
  const int64_t n_pages = std::min(P, int64_t(std::ceil(q_keep_ * double(p1) / double(ps) - 1e-9)));
  const int64_t n_cand = q_refine_ > 1 ? std::min(P, int64_t(std::ceil(q_refine_ * double(n_pages) - 1e-9))) : n_pages;
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

}  // namespace sparseland
