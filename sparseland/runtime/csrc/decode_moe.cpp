// The fused decode step's MoE block (Mixtral, Qwen2-MoE; transformers' modeling_mixtral.py and
// modeling_qwen2_moe.py are the reference, as the lean loop's Python step runs them). Per token x:
//   p = softmax(Wr x) over all E experts (Wr: the router, dense float32) ;
//   the top_k experts by p, exact ties to the lower index ; w_j = p[e_j], divided by their sum
//   when norm_topk (Mixtral always, Qwen2-MoE per config.norm_topk_prob) ;
//   y = sum_j w_j Wd_j (act(Wg_j x) * Wu_j x)  [+ sigmoid(ws . x) Wd_s (act(Wg_s x) * Wu_s x): Qwen2-MoE's
//   shared expert] ; h += mlp_out(y)
// Every thread computes the router's E dot products and the top-k itself, the same arithmetic on the
// same input, so all threads agree without a barrier. torch.topk (the Python step) promises no order
// among exactly equal values (on CPU 8 equal probabilities give experts [6, 5]), so on an exact tie --
// e.g. an all-zero router -- the two steps may choose different experts of equal weight. Then two splits, as the dense MLP: the gate/up
// rows of the chosen experts and the shared one as one row space [e_1 | ... | e_k | shared], then the
// output rows of the weighted sum of their down projections. Each expert projection is one weight kind
// (decode_lin.cpp), and only the chosen experts' weights are read.
//
// add_layer names (instead of gate / up / down): ints moe.experts (E), moe.top_k, moe.inter (the experts'
// width), moe.norm_topk (default 1), moe.shared_inter (0 / absent: no shared expert); tensor router.w
// (E, C) float32; projections e<j>.gate, e<j>.up (inter, C) and e<j>.down (C, inter) for j < E; with a
// shared expert shared_gate, shared_up (shared_inter, C), shared_down (C, shared_inter) and
// shared_expert_gate (1, C). The row-major kinds only (no activation-sparse kinds or input sites).
#include <algorithm>
#include <cmath>
#include <string>

#include "decode_step.h"

namespace sparseland {

using namespace decode;

namespace {

constexpr int64_t kMaxExperts = 1024, kMaxTopK = 64;

struct Route {
  int64_t idx[kMaxTopK];
  float w[kMaxTopK];
  float shared = 0.0f;  // sigmoid(ws . x), with a shared expert
};

// The chosen experts and their weights for the normed input x (C,), on the calling thread.
void route(const Layer& ly, const float* x, int64_t C, Route& r) {
  float p[kMaxExperts];
  float mx = -INFINITY;
  for (int64_t e = 0; e < ly.n_exp; ++e) mx = std::max(mx, p[e] = dot(ly.router + e * C, x, C));
  float sum = 0.0f;
  for (int64_t e = 0; e < ly.n_exp; ++e) sum += (p[e] = std::exp(p[e] - mx));
  for (int64_t e = 0; e < ly.n_exp; ++e) p[e] /= sum;
  bool taken[kMaxExperts] = {};
  float top = 0.0f;
  for (int64_t j = 0; j < ly.top_k; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < ly.n_exp; ++e)  // strictly greater: the lower index wins a tie
      if (!taken[e] && (best < 0 || p[e] > p[best])) best = e;
    taken[best] = true;
    r.idx[j] = best, r.w[j] = p[best], top += p[best];
  }
  if (ly.norm_topk)
    for (int64_t j = 0; j < ly.top_k; ++j) r.w[j] /= top;
  if (ly.s_inter > 0) {
    float g = 0.0f;
    ly.sgate.run(x, &g, 0, 1);
    r.shared = 1.0f / (1.0f + std::exp(-g));
  }
}

}  // namespace

void DecodeStep::parse_moe(Args& a, Layer& ly) {
  const int64_t l = a.layer();
  ly.moe = true;
  ly.n_exp = a.integer("moe.experts", 0), ly.top_k = a.integer("moe.top_k", 0);
  ly.e_inter = a.integer("moe.inter", 0), ly.s_inter = a.integer("moe.shared_inter", 0);
  ly.norm_topk = a.integer("moe.norm_topk", 1) != 0;
  TORCH_CHECK(ly.top_k > 0 && ly.top_k <= ly.n_exp && ly.n_exp <= kMaxExperts && ly.top_k <= kMaxTopK &&
                  ly.e_inter > 0 && ly.s_inter >= 0,
              "DecodeStep.add_layer: layer ", l, ": MoE needs 0 < top_k <= experts <= ", kMaxExperts, ", top_k <= ",
              kMaxTopK, ", inter > 0");
  const at::Tensor& rw = a.tensor("router.w");
  TORCH_CHECK(rw.scalar_type() == at::kFloat && rw.is_contiguous() && rw.dim() == 2 && rw.size(0) == ly.n_exp &&
                  rw.size(1) == C_,
              "DecodeStep.add_layer: layer ", l, ": router.w must be contiguous float32 (experts, C)");
  ly.router = rw.data_ptr<float>();
  const int64_t I = ly.e_inter, Is = ly.s_inter;
  ly.eg.resize(ly.n_exp), ly.eu.resize(ly.n_exp), ly.ed.resize(ly.n_exp);
  for (int64_t e = 0; e < ly.n_exp; ++e) {
    const std::string p = "e" + std::to_string(e) + ".";
    parse_lin(a, p + "gate", ly.eg[e], I, C_);
    parse_lin(a, p + "up", ly.eu[e], I, C_);
    parse_lin(a, p + "down", ly.ed[e], C_, I);
  }
  if (Is > 0) {
    parse_lin(a, "shared_gate", ly.sg, Is, C_);
    parse_lin(a, "shared_up", ly.su, Is, C_);
    parse_lin(a, "shared_down", ly.sd, C_, Is);
    parse_lin(a, "shared_expert_gate", ly.sgate, 1, C_);
  }
  auto row_major = [](const Lin& lin) { return !lin.act(); };
  bool ok = std::all_of(ly.eg.begin(), ly.eg.end(), row_major) && std::all_of(ly.eu.begin(), ly.eu.end(), row_major) &&
            std::all_of(ly.ed.begin(), ly.ed.end(), row_major);
  ok = ok && (Is == 0 || (row_major(ly.sg) && row_major(ly.su) && row_major(ly.sd) && row_major(ly.sgate)));
  TORCH_CHECK(ok, "DecodeStep.add_layer: layer ", l, ": MoE experts run the row-major kinds only");
  // [e_1 | ... | e_k | shared], each segment padded to 8 and 8 zeros more (the kernels read x padded)
  const int64_t n = ly.top_k * (pad8(I) + 8) + pad8(Is) + 8;
  for (auto* buf : {&moe_g_, &moe_u_, &moe_a_})
    if ((int64_t)buf->size() < n) buf->assign(n, 0.0f);
  if ((int64_t)moe_y_.size() < pad8(C_) + 8) moe_y_.assign(pad8(C_) + 8, 0.0f), moe_t_.assign(pad8(C_) + 8, 0.0f);
}

// Steps 5 and 6 of an MoE layer: h (this thread's copy H) += mlp_out(y) for the normed input xn;
// scratch: a free (C,) buffer of this thread for the mlp_out norm.
void DecodeStep::moe(const Exec& ex, const Layer& ly, const float* xn, float* H, float* scratch) {
  Route r;
  route(ly, xn, C_, r);
  const int64_t I = ly.e_inter, Is = ly.s_inter, K = ly.top_k, S = pad8(I) + 8;
  float *G = moe_g_.data(), *U = moe_u_.data(), *A = moe_a_.data();
  ex.split(K * I + Is, [&](int64_t r0, int64_t r1) {  // rows of [e_1 | ... | e_k | shared]
    for (int64_t j = 0; j <= K; ++j) {
      const int64_t base = j * I, len = j < K ? I : Is;
      const int64_t a = std::clamp(r0 - base, int64_t(0), len), b = std::clamp(r1 - base, int64_t(0), len);
      if (a >= b) continue;
      const Lin& g = j < K ? ly.eg[r.idx[j]] : ly.sg;
      const Lin& u = j < K ? ly.eu[r.idx[j]] : ly.su;
      float *Gj = G + j * S, *Uj = U + j * S, *Aj = A + j * S;
      g.run(xn, Gj, a, b);
      u.run(xn, Uj, a, b);
      for (int64_t i = a; i < b; ++i) Aj[i] = act_value(ly.act_fn, Gj[i]) * Uj[i];
    }
  });
  float *Y = moe_y_.data(), *T = moe_t_.data();
  ex.split(C_, [&](int64_t r0, int64_t r1) {  // output rows: the weighted sum of the down projections
    std::fill(Y + r0, Y + r1, 0.0f);
    for (int64_t j = 0; j < K + (Is > 0); ++j) {
      const Lin& d = j < K ? ly.ed[r.idx[j]] : ly.sd;
      const float w = j < K ? r.w[j] : r.shared;
      d.run(A + j * S, T, r0, r1);
      for (int64_t c = r0; c < r1; ++c) Y[c] += w * T[c];
    }
  });
  const float* add = Y;
  if (ly.mlp_out.on()) apply_norm(Y, ly.mlp_out, ly.norm_offset, scratch, C_), add = scratch;
  for (int64_t c = 0; c < C_; ++c) H[c] += add[c];
}

}  // namespace sparseland
