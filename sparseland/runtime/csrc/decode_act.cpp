// The fused decode step's projections and activation sites (sparseland.activations), as the hooks
// apply them:
//   input site on a Linear:  its input x -> x * (|x| > t) (t scalar or per channel), then its kernel
//                            runs over the nonzero inputs only (an actsparse / actsparse_bitmask kind);
//   gate_act site:           g = Wg x -> g * (|act(g)| > t), so act(g) * up is zero there and the
//                            rows of Wu for those channels are not computed (a row-format Wu).
// Activation-sparse kernels split output columns in blocks of 16 across threads (Lin::run_act).
#include <algorithm>
#include <cmath>

#include "actsparse_mv.h"
#include "decode_step.h"

namespace sparseland {
namespace decode {

// The calling thread's accumulator for actsparse_bitmask_mv (OpenMP region threads and torch's pool
// threads alike), at least n floats.
float* acc_buffer(int64_t n) {
  thread_local std::vector<float> acc;
  if ((int64_t)acc.size() < n) acc.resize(n);
  return acc.data();
}

}  // namespace decode

using namespace decode;

void DecodeStep::act_scratch(int nt) {  // per-thread buffers of the activation-sparse path, allocated once
  if ((int64_t)scratch_.size() >= nt) return;
  const int64_t maxw = pad8(std::max({C_, I_, H_ * D_})) + 16;
  scratch_.resize(nt);
  for (auto& sc : scratch_)
    for (int j = 0; j < 3; ++j) sc.act[j].resize(maxw), sc.xa[j].resize(maxw);
  keep_.assign(I_, 0);
}

// The active inputs of lin from x (its input site's rule), into list j of sc.
ActIn DecodeStep::gather(const Lin& lin, const float* x, ActScratch& sc, int j) const {
  return ActIn{sc.act[j].data(), sc.xa[j].data(), act_gather(x, lin.thr, lin.in, sc.act[j].data(), sc.xa[j].data())};
}

// Step 1b: q, k, v from xn as one row space [q | k | v] in qkv_ (views of a fused qkv write their rows
// of it); activation-sparse ones from their active inputs (shared if equal rules).
void DecodeStep::project_qkv(const Exec& ex, const Layer& ly, const float* xn) {
  const int64_t HD = H_ * D_, KD = KVH_ * D_;
  float* q = qkv_.data();
  float* k = q + HD;
  float* v = k + KD;
  if (ly.per_head) {  // GPT-NeoX: the fused matrix's rows in their own order; prepare_qk splits them
    ex.split(HD + 2 * KD, [&](int64_t r0, int64_t r1) { ly.q.run(xn, raw_.data(), r0, r1); });
    return;
  }
  if (!ly.act) {
    ex.split(HD + 2 * KD, [&](int64_t r0, int64_t r1) {
      ly.q.run(xn, q, std::min(r0, HD), std::min(r1, HD));
      ly.k.run(xn, k, std::clamp(r0 - HD, int64_t(0), KD), std::clamp(r1 - HD, int64_t(0), KD));
      ly.v.run(xn, v, std::clamp(r0 - HD - KD, int64_t(0), KD), std::clamp(r1 - HD - KD, int64_t(0), KD));
    });
    return;
  }
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

// Steps 4 and 6: y = W x split across the threads (one barrier), then every thread adds post(y) to its
// own copy H of h (post: a sandwich / post norm over the whole output, into the thread's scratch).
void DecodeStep::project_add(const Exec& ex, const Lin& lin, const float* x, const Norm& post, float offset,
                             float* H, float* scratch) {
  float* y = tmp_.data();
  ActIn a;
  if (lin.act()) a = gather(lin, x, scratch_[ex.region ? ex.tid : 0], 0);
  ex.split(C_, [&](int64_t r0, int64_t r1) {
    if (lin.act()) lin.run_act(a, y, r0, r1, acc_buffer(acc_n_));
    else lin.run(x, y, r0, r1);
  });
  const float* add = y;
  if (post.on()) apply_norm(y, post, offset, scratch, C_), add = scratch;
  for (int64_t r = 0; r < C_; ++r) H[r] += add[r];
}

// Step 5: the MLP's act = act(Wg x) * (Wu x) into act_, row blocks of both (non-gated: act(Wu x + bu)).
void DecodeStep::mlp(const Exec& ex, const Layer& ly, const float* xn) {
  if (ly.act) return mlp_act(ex, ly, xn);
  float* G = gu_.data();
  float* U = G + I_;  // a view of a fused gate_up writes its up rows here: rows [I, 2I) of the same buffer
  float* A = act_.data();
  if (!ly.gated) {
    ex.split(I_, [&](int64_t r0, int64_t r1) {
      ly.up.run(xn, U, r0, r1);
      for (int64_t r = r0; r < r1; ++r) A[r] = act_value(ly.act_fn, U[r]);
    });
    return;
  }
  ex.split(I_, [&](int64_t r0, int64_t r1) {
    ly.gate.run(xn, G, r0, r1);
    ly.up.run(xn, U, r0, r1);
    for (int64_t r = r0; r < r1; ++r) A[r] = act_value(ly.act_fn, G[r]) * U[r];
  });
}

// Step 5 of an activation-sparse layer: act = act(g) * up over row blocks aligned to 16, where g is
// gated by the gate_act site (kept: |act(g)| > t); up is computed only for kept rows.
void DecodeStep::mlp_act(const Exec& ex, const Layer& ly, const float* xn) {
  ActScratch& sc = scratch_[ex.region ? ex.tid : 0];
  ActIn ag, au;
  if (ly.gate.act()) ag = gather(ly.gate, xn, sc, 0);
  if (ly.up.act()) au = ly.gate.act() && ly.gate.thr == ly.up.thr ? ag : gather(ly.up, xn, sc, 1);
  float* G = gu_.data();
  float* U = G + I_;
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
      for (int64_t r = r0; r < r1; ++r) A[r] = act_value(ly.act_fn, G[r]) * U[r];
      return;
    }
    for (int64_t r = r0; r < r1; ++r) {  // the gate_act site: A = act(g) where kept
      const float sg = act_value(ly.act_fn, G[r]);
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

}  // namespace sparseland
