// Fused decode step (T == 1): every decoder layer of one token in one call, no allocation. The layer
// loop; what each stage does lives beside it (decode_step.h lists the files).
//
// Per layer (the lean loop's Python step, generate.py, in the same order), norms where the layer has
// them (pre: attn_in, mlp_in; sandwich: all four; post: attn_out, mlp_out), each (offset + w) RMSNorm:
//   x = attn_in(h) ; q, k, v = Wq x, Wk x, Wv x (or views of one fused Wqkv) ; [+ q/k/v biases ;
//   q/k RMSNorm per head or over all heads] ; RoPE(q, k) with the layer's cos/sin table ;
//   k, v -> cache[layer, :, pos] ; o = softmax(cap(q K^T * scale)) V over positions
//   (pos - window, pos] (GQA; all positions without a window; cap: soft-capping, if set) ;
//   h += attn_out(Wo o) ; x = mlp_in(h) ; h += mlp_out(Wd (act(Wg x) * Wu x)), act SiLU or GELU-tanh
// Each W is one weight kind (decode_lin.cpp: dense fp32/bf16, bitmask, N:M, the quantized kinds, or
// the activation-sparse kinds of sparseland.activations, decode_act.cpp).
//
// A layer is added by name (add_layer: tensors, ints and floats keyed as decode_lin.cpp and
// add_layer's comment list them); every name is checked, an unknown one is an error.
//
// Quest (set_quest): decode_quest.cpp. int8 KV cache (set_int8_cache; generate.py quantize_kv is the
// reference): K and V as int8 codes (L, KVH, T_max, D) with one float32 scale per (layer, KV head,
// position), scale = max|x| / 127 and codes = round_half_even(x / scale); keys quantized after RoPE.
// Scores are scale_k[t] * (q . k_int8[t]); the output sum_t p_t * scale_v[t] * v_int8[t]
// (decode_attention.cpp). Quest needs the float cache (set_quest refuses int8).
//
// Threading (torch.set_num_threads): mode 1 runs one OpenMP region for the whole step, every matvec's
// rows split statically across the threads with a barrier between dependent stages (~6 per layer);
// mode 0 wakes torch's pool once per matvec (parallel_rows), like the per-module Python path. With one
// thread both run serially. One call at a time per object (a mutex): two Python threads may share it.
#include "decode_step.h"

#include <omp.h>
#include <torch/library.h>

#include <algorithm>

namespace sparseland {

using namespace decode;

// k_cache / v_cache: (L, KVH, T_max, D) float32, written at each position; L layers follow (add_layer).
DecodeStep::DecodeStep(int64_t C, int64_t I, int64_t H, int64_t KVH, int64_t D, double scale, at::Tensor k_cache,
                       at::Tensor v_cache)
    : k_cache_(k_cache), v_cache_(v_cache), C_(C), I_(I), H_(H), KVH_(KVH), D_(D), scale_(float(scale)) {
  TORCH_CHECK(C_ > 0 && I_ > 0 && H_ > 0 && KVH_ > 0 && D_ > 0 && D_ % 2 == 0 && H_ % KVH_ == 0,
              "DecodeStep: bad dimensions");
  for (const at::Tensor* c : {&k_cache_, &v_cache_})
    TORCH_CHECK(c->scalar_type() == at::kFloat && c->is_contiguous() && c->dim() == 4 && c->size(0) > 0 &&
                    c->size(1) == KVH_ && c->size(3) == D_,
                "DecodeStep: caches must be contiguous float32 (L, KVH, T_max, D)");
  L_ = k_cache_.size(0);
  Tmax_ = k_cache_.size(2);
  TORCH_CHECK(v_cache_.size(0) == L_ && v_cache_.size(2) == Tmax_, "DecodeStep: k and v caches differ in shape");
  const int64_t maxw = pad8(std::max({C_, I_, H_ * D_})) + 8;
  qkv_.assign(pad8(H_ * D_ + 2 * KVH_ * D_) + 8, 0.0f);
  raw_.assign(pad8(H_ * D_ + 2 * KVH_ * D_) + 8, 0.0f);
  att_.assign(pad8(H_ * D_) + 8, 0.0f);
  tmp_.assign(maxw, 0.0f);
  gu_.assign(pad8(2 * I_) + 8, 0.0f);
  act_.assign(pad8(I_) + 8, 0.0f);
  scores_.assign(H_ * Tmax_, 0.0f);
  acc_n_ = maxw + 32;
}

// The next layer, by name. Tensors: norms attn_in / attn_out / mlp_in / mlp_out (C,) (each optional,
// with a float <name>_eps); projections q, k, v (or qkv: one fused [q | k | v] matrix), o, gate, up (or
// gate_up: [gate | up]), down, each as decode_lin.cpp names them (ints <p>.kind); gate.act_thr (I,) a
// gate_act site; q.bias / k.bias / v.bias; q_norm / k_norm ((D,) with ints qk_norm = 1, or (H*D,) /
// (KVH*D,) with qk_norm = 2) and float qk_eps. Ints act_fn (0 SiLU, 1 GELU-tanh, 2 GELU), window (0: none),
// rope (cos/sin table). Floats norm_offset (1: Gemma's (1 + w)), softcap (0: none). Returns its index.
// GPT-NeoX: ints layernorm = 1 (every norm a LayerNorm, with <norm>.bias), qkv_per_head = 1 (qkv's rows
// [q_h k_h v_h] per head, H == KVH; qkv.bias in that order), parallel = 1 (parallel residual), rope_dim
// (the rotary dims of each head, default D; the same in every layer); no gate (up and down only: a
// non-gated MLP act(up)); o.bias, up.bias, down.bias. Biases only on the row-major kinds.
// MoE block (int moe.experts present): no gate/up/down; decode_moe.cpp parse_moe lists its names.
int64_t DecodeStep::add_layer(Tensors tensors, Ints ints, Floats floats) {
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t l = int64_t(layers_.size()), HD = H_ * D_, KD = KVH_ * D_;
  TORCH_CHECK(l < L_, "DecodeStep.add_layer: the cache holds ", L_, " layers; all are added");
  Args a(tensors, ints, floats, l);
  Layer ly;
  ly.norm_offset = float(a.real("norm_offset", 0.0));
  auto vec = [&](const std::string& name, int64_t n) -> const float* {
    const at::Tensor* t = a.maybe(name);
    if (t == nullptr) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == n, "DecodeStep.add_layer: layer ",
                l, " ", name, " must be contiguous float32 with ", n, " elements");
    return t->data_ptr<float>();
  };
  const bool ln = a.integer("layernorm", 0) != 0;
  auto norm = [&](const std::string& name, int64_t n) {
    Norm out;
    out.w = vec(name, n);
    if (out.w != nullptr) {
      TORCH_CHECK(a.has(name + "_eps"), "DecodeStep.add_layer: layer ", l, " norm ", name, " needs ", name, "_eps");
      out.eps = float(a.real(name + "_eps", 0.0));
      out.ln = ln;
      out.b = ln ? vec(name + ".bias", n) : nullptr;
    }
    return out;
  };
  ly.attn_in = norm("attn_in", C_), ly.attn_out = norm("attn_out", C_);
  ly.mlp_in = norm("mlp_in", C_), ly.mlp_out = norm("mlp_out", C_);
  ly.per_head = a.integer("qkv_per_head", 0) != 0;
  if (ly.per_head) {  // one matrix, rows [q_h k_h v_h] per head: run whole, split after (prepare_qk)
    TORCH_CHECK(H_ == KVH_ && a.has("qkv.kind"), "DecodeStep.add_layer: layer ", l,
                ": qkv_per_head needs a fused qkv and as many KV heads as query heads");
    parse_lin(a, "qkv", ly.q, HD + 2 * KD, C_);
    ly.q.bias = vec("qkv.bias", HD + 2 * KD);
  } else if (a.has("qkv.kind")) {  // views of one [q | k | v] matrix
    parse_lin(a, "qkv", ly.q, HD + 2 * KD, C_);
    TORCH_CHECK(!ly.q.act(), "DecodeStep.add_layer: layer ", l, ": a fused qkv runs the row-major kinds only");
    ly.k = ly.v = ly.q;
    ly.q.out = HD, ly.k.off = HD, ly.k.out = KD, ly.v.off = HD + KD, ly.v.out = KD;
  } else {
    parse_lin(a, "q", ly.q, HD, C_);
    parse_lin(a, "k", ly.k, KD, C_);
    parse_lin(a, "v", ly.v, KD, C_);
  }
  parse_lin(a, "o", ly.o, C_, HD);
  ly.o.bias = vec("o.bias", C_);
  ly.gated = a.has("gate.kind") || a.has("gate_up.kind") || a.has("moe.experts");
  if (a.has("moe.experts")) {  // an MoE block (decode_moe.cpp) instead of the MLP
    parse_moe(a, ly);
  } else if (!ly.gated) {  // act(up): GPT-NeoX's dense_h_to_4h
    parse_lin(a, "up", ly.up, I_, C_);
    ly.up.bias = vec("up.bias", I_);
  } else if (a.has("gate_up.kind")) {  // views of one [gate | up] matrix
    parse_lin(a, "gate_up", ly.gate, 2 * I_, C_);
    TORCH_CHECK(!ly.gate.act(), "DecodeStep.add_layer: layer ", l, ": a fused gate_up runs the row-major kinds only");
    ly.up = ly.gate;
    ly.gate.out = I_, ly.up.off = I_, ly.up.out = I_;
  } else {
    parse_lin(a, "gate", ly.gate, I_, C_);
    parse_lin(a, "up", ly.up, I_, C_);
  }
  if (!ly.moe) parse_lin(a, "down", ly.down, C_, I_);
  ly.down.bias = vec("down.bias", C_);
  ly.gate_thr = vec("gate.act_thr", I_);
  for (const Lin* lin : {&ly.q, &ly.k, &ly.v, &ly.o, &ly.gate, &ly.up, &ly.down}) {
    ly.act = ly.act || lin->act();
    TORCH_CHECK(lin->bias == nullptr || !lin->act(), "DecodeStep.add_layer: layer ", l,
                ": a bias on an activation-sparse projection is not run");
  }
  ly.act = ly.act || ly.gate_thr != nullptr;
  TORCH_CHECK(ly.gated || !ly.act, "DecodeStep.add_layer: layer ", l,
              ": a non-gated MLP runs without activation sparsity");
  TORCH_CHECK(!ly.per_head || !ly.act, "DecodeStep.add_layer: layer ", l, ": a per-head qkv runs without activation sparsity");
  ly.parallel = a.integer("parallel", 0) != 0;
  const int64_t rd = a.integer("rope_dim", D_);
  TORCH_CHECK(rd > 0 && rd <= D_ && rd % 2 == 0 && (l == 0 || rd == RD_), "DecodeStep.add_layer: layer ", l,
              ": rope_dim must be even, in (0, D] and the same in every layer");
  ly.bq = vec("q.bias", HD), ly.bk = vec("k.bias", KD), ly.bv = vec("v.bias", KD);
  ly.qk_norm = a.integer("qk_norm", kNoQKNorm);
  TORCH_CHECK(ly.qk_norm >= kNoQKNorm && ly.qk_norm <= kAllNorm, "DecodeStep.add_layer: qk_norm is 0, 1 or 2");
  if (ly.qk_norm != kNoQKNorm) {
    const bool all = ly.qk_norm == kAllNorm;
    ly.qn.w = vec("q_norm", all ? HD : D_), ly.kn.w = vec("k_norm", all ? KD : D_);
    TORCH_CHECK(ly.qn.on() && ly.kn.on(), "DecodeStep.add_layer: layer ", l, ": qk_norm needs q_norm and k_norm");
    ly.qn.eps = ly.kn.eps = float(a.real("qk_eps", 0.0));
  }
  ly.act_fn = a.integer("act_fn", kSilu);
  ly.window = a.integer("window", 0);
  ly.rope = a.integer("rope", 0);
  ly.softcap = float(a.real("softcap", 0.0));
  TORCH_CHECK(ly.act_fn == kSilu || ly.act_fn == kGeluTanh || ly.act_fn == kGelu,
              "DecodeStep.add_layer: act_fn is 0 (SiLU), 1 (GELU-tanh) or 2 (GELU)");
  TORCH_CHECK(ly.window >= 0 && ly.rope >= 0 && ly.rope < 16 && ly.softcap >= 0,
              "DecodeStep.add_layer: window >= 0, rope in [0, 16), softcap >= 0");
  const std::string unused = a.unused();
  TORCH_CHECK(unused.empty(), "DecodeStep.add_layer: layer ", l, ": unknown names", unused);
  tensors_.insert(tensors_.end(), a.kept.begin(), a.kept.end());
  R_ = std::max(R_, ly.rope + 1);
  RD_ = rd;
  any_act_ = any_act_ || ly.act;
  layers_.push_back(ly);
  return l;
}

// h (C,) float32, the embedded token, overwritten with the last layer's output and returned; cos, sin
// (R, RD) for position `pos` (R tables: a layer uses table `rope`; RD the rotary dims, D unless partial);
// mode 1: one OpenMP region for the
// step, 0: torch's pool per matvec.
at::Tensor DecodeStep::step(at::Tensor h, at::Tensor cos, at::Tensor sin, int64_t pos, int64_t mode) {
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(int64_t(layers_.size()) == L_, "DecodeStep.step: ", layers_.size(), " of ", L_, " layers added");
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.is_contiguous() && h.numel() == C_,
              "DecodeStep.step: h must be contiguous float32 with ", C_, " elements");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat && cos.is_contiguous() &&
                  sin.is_contiguous() && cos.numel() == R_ * RD_ && sin.numel() == R_ * RD_,
              "DecodeStep.step: cos and sin must be contiguous float32 (R, RD) = (", R_, ", ", RD_, ")");
  TORCH_CHECK(pos >= 0 && pos < Tmax_, "DecodeStep.step: position ", pos, " is outside the cache (", Tmax_, ")");
  float* H = h.data_ptr<float>();
  const float* c = cos.data_ptr<float>();
  const float* s = sin.data_ptr<float>();
  const int nt = int(at::get_num_threads());
  if (mode == 1 && nt > 1) {
    if ((int64_t)xn_.size() < nt) xn_.resize(nt), xn2_.resize(nt), hp_.resize(nt);
    for (auto* bufs : {&xn_, &xn2_, &hp_})
      for (auto& b : *bufs)
        if (b.empty()) b.assign(pad8(C_) + 8, 0.0f);
    if (any_act_) act_scratch(nt);
#pragma omp parallel num_threads(nt)
    {
      Exec ex{true, omp_get_thread_num(), omp_get_num_threads()};
      run(ex, H, c, s, pos);
    }
  } else {
    if (xn_.empty()) xn_.resize(1), xn2_.resize(1), hp_.resize(1);
    for (auto* bufs : {&xn_, &xn2_, &hp_})
      if ((*bufs)[0].empty()) (*bufs)[0].assign(pad8(C_) + 8, 0.0f);
    if (any_act_) act_scratch(1);
    run(Exec{false, 0, 1}, H, c, s, pos);
  }
  return h;
}

// x = norm(h), or a copy of h where the layer has no norm (the kernels read x zero-padded to 8).
static void normed(const Norm& n, float offset, const float* h, float* x, int64_t C) {
  if (n.on()) apply_norm(h, n, offset, x, C);
  else std::copy(h, h + C, x);
}

// h_out: the shared h, read at the start and written at the end; in between every thread updates its own
// copy of h (the same arithmetic in each: the copies stay equal), so a projection's output is added, and
// normalized first where the layer has a post norm, without another barrier after the projection.
void DecodeStep::run(const Exec& ex, float* h_out, const float* cos, const float* sin, int64_t pos) {
  const int64_t HD = H_ * D_, KD = KVH_ * D_, p1 = pos + 1;
  const int me = ex.region ? ex.tid : 0;
  float* xn = xn_[me].data();  // each thread normalizes h into its own buffer
  float* xn2 = xn2_[me].data();
  float* H = hp_[me].data();  // this thread's copy of h
  std::copy(h_out, h_out + C_, H);
  float* q = qkv_.data();
  float* k = q + HD;
  float* v = k + KD;
  for (int64_t l = 0; l < L_; ++l) {
    const Layer& ly = layers_[l];
    const float* c = cos + ly.rope * RD_;
    const float* s = sin + ly.rope * RD_;
    // Step 1: the attention input (and, with a parallel residual, the MLP's, from the same h), q, k, v
    normed(ly.attn_in, ly.norm_offset, H, xn, C_);
    if (ly.parallel) normed(ly.mlp_in, ly.norm_offset, H, xn2, C_);
    project_qkv(ex, ly, xn);
    // Step 2: extras, RoPE on q and k; k, v into the cache at pos. Step 3: attention into att_
    if (int8_) {
      ex.single([&] {
        prepare_qk(ly, c, s);
        const int64_t base = l * KVH_ * Tmax_;  // (KVH, T_max) of layer l
        for (int64_t kh = 0; kh < KVH_; ++kh) {
          const int64_t at = base + kh * Tmax_ + pos;
          ks_.data_ptr<float>()[at] = quantize_i8(k + kh * D_, kq_.data_ptr<int8_t>() + at * D_, D_);
          vs_.data_ptr<float>()[at] = quantize_i8(v + kh * D_, vq_.data_ptr<int8_t>() + at * D_, D_);
        }
      });
      attend_int8(ex, l, q, p1);
    } else {
      float* kc = k_cache_.data_ptr<float>() + l * KVH_ * Tmax_ * D_;  // (KVH, T_max, D)
      float* vc = v_cache_.data_ptr<float>() + l * KVH_ * Tmax_ * D_;
      ex.single([&] {
        prepare_qk(ly, c, s);
        for (int64_t kh = 0; kh < KVH_; ++kh) {
          std::copy(k + kh * D_, k + (kh + 1) * D_, kc + (kh * Tmax_ + pos) * D_);
          std::copy(v + kh * D_, v + (kh + 1) * D_, vc + (kh * Tmax_ + pos) * D_);
        }
        if (quest_layer(l)) page_bounds(l, kc, p1);
      });
      attend(ex, l, q, kc, vc, p1);
    }
    // Step 4: h += attn_out(Wo o)
    project_add(ex, ly.o, att_.data(), ly.attn_out, ly.norm_offset, H, xn);  // xn: free again, scratch
    // Step 5: the MLP input, act = act(Wg x) * (Wu x) (non-gated: act(Wu x + bu))
    if (!ly.parallel) normed(ly.mlp_in, ly.norm_offset, H, xn, C_);
    if (ly.moe) {  // Steps 5 and 6 of an MoE block: h += mlp_out(the chosen experts' weighted sum)
      moe(ex, ly, ly.parallel ? xn2 : xn, H, ly.parallel ? xn : xn2);
      continue;
    }
    mlp(ex, ly, ly.parallel ? xn2 : xn);
    // Step 6: h += mlp_out(Wd act)
    project_add(ex, ly.down, act_.data(), ly.mlp_out, ly.norm_offset, H, xn);
  }
  if (me == 0) std::copy(H, H + C_, h_out);  // the region's end waits for it
}

// Step 2 (one thread): a per-head fused qkv's rows split into [q | k | v]; the q/k/v extras; RoPE on the
// first RD_ dims of every q and k head.
void DecodeStep::prepare_qk(const Layer& ly, const float* c, const float* s) {
  float* q = qkv_.data();
  float* k = q + H_ * D_;
  float* v = k + KVH_ * D_;
  if (ly.per_head)
    for (int64_t hh = 0; hh < H_; ++hh) {  // H == KVH
      const float* src = raw_.data() + hh * 3 * D_;
      std::copy(src, src + D_, q + hh * D_);
      std::copy(src + D_, src + 2 * D_, k + hh * D_);
      std::copy(src + 2 * D_, src + 3 * D_, v + hh * D_);
    }
  qkv_extras(ly, q, k, v, H_, KVH_, D_);
  for (int64_t hh = 0; hh < H_; ++hh) rope(q + hh * D_, c, s, RD_);
  for (int64_t kh = 0; kh < KVH_; ++kh) rope(k + kh * D_, c, s, RD_);
}

}  // namespace sparseland

TORCH_LIBRARY_FRAGMENT(sparseland, m) {
  m.class_<sparseland::DecodeStep>("DecodeStep")
      .def(torch::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, at::Tensor, at::Tensor>())
      .def("add_layer", &sparseland::DecodeStep::add_layer)
      .def("step", &sparseland::DecodeStep::step)
      .def("num_layers", &sparseland::DecodeStep::num_layers)
      .def("set_quest", &sparseland::DecodeStep::set_quest)
      .def("invalidate", &sparseland::DecodeStep::invalidate)
      .def("set_int8_cache", &sparseland::DecodeStep::set_int8_cache);
}
