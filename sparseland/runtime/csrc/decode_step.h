// The fused decode step's parts, shared by the files that implement it (the math: decode_step.cpp):
//   decode_step.cpp       the class: construction, add_layer, step, the layer loop, registration
//   decode_lin.cpp        weight kinds: one Linear's tensors checked and dispatched to its kernel
//   decode_attention.cpp  norms, RoPE, q/k extras, attention over the float32 and the int8 KV cache
//   decode_quest.cpp      Quest's page bounds and page selection
//   decode_act.cpp        activation sites: active-input lists and the (activation-sparse) MLP
//   decode_moe.cpp        MoE blocks: the router's top-k experts (and a shared expert) per token
#pragma once
#include <ATen/core/Dict.h>
#include <torch/custom_class.h>

#include <cmath>
#include <deque>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace sparseland {
namespace decode {

enum Kind : int64_t { kDense = 0, kBitmask = 1, kNM4 = 2, kAct = 3, kActBitmask = 4, kQ4 = 5, kQ8 = 6, kQ4NM = 7,
                       kQ4Bitmask = 8 };
enum MlpAct : int64_t { kSilu = 0, kGeluTanh = 1, kGelu = 2 };     // the MLP's act(gate) (or act(up), non-gated)
enum QKNorm : int64_t { kNoQKNorm = 0, kHeadNorm = 1, kAllNorm = 2 };  // per head (Qwen3, Gemma 3) / all heads (OLMo 2)

inline int64_t pad8(int64_t n) { return (n + 7) / 8 * 8; }
// A split boundary for the activation-sparse kernels: a multiple of 16, or the end. Every thread maps
// the same boundary to the same value, so the rounded ranges still tile [0, n).
inline int64_t align16(int64_t r, int64_t n) { return r >= n ? n : r & ~int64_t(15); }

// The MLP activation: SiLU, GELU with the tanh approximation as torch computes it (gelu_pytorch_tanh), or
// the exact (erf) GELU (GPT-NeoX's "gelu").
inline float act_value(int64_t kind, float g) {
  if (kind == kSilu) return g / (1.0f + std::exp(-g));
  if (kind == kGelu) return 0.5f * g * (1.0f + std::erf(g * 0.70710678118654752f));
  constexpr float kBeta = 0.7978845608028654f;  // sqrt(2 / pi)
  return 0.5f * g * (1.0f + std::tanh(kBeta * (g + 0.044715f * g * g * g)));
}

// One Linear's active inputs (act_gather): indices and values.
struct ActIn {
  const int64_t* act = nullptr;
  const float* xa = nullptr;
  int64_t na = 0;
};

// One projection: a weight of one kind (decode_lin.cpp). A view of a fused projection (Phi-3's qkv_proj
// and gate_up_proj) shares the packed matrix and owns its rows [off, off + out).
struct Lin {
  int64_t kind = kDense, in = 0, out = 0, in8 = 0, off = 0;
  bool bf16 = false;
  const void* w = nullptr;  // dense weight, or packed values / codes
  const uint8_t* mask = nullptr;
  const int64_t* row_ptr = nullptr;
  const float* thr = nullptr;  // (in,) input-site threshold (activation-sparse kinds), or none
  const float* bias = nullptr;  // (out,) added by run() (row-major kinds: o, up, down, a per-head qkv), or none
  // quantized kinds (qmatvec.h): float16 scales / offsets (offset null: symmetric), columns per scale
  const at::Half* scale = nullptr;
  const at::Half* offset = nullptr;
  int64_t group = 0;

  bool act() const { return kind == kAct || kind == kActBitmask; }
  // rows [r0, r1) of the view (y indexed by them) of a row-major kind, from the full input x
  void run(const float* x, float* y, int64_t r0, int64_t r1) const;
  // outputs [align16(r0), align16(r1)) of an activation-sparse kind from its active inputs; acc: scratch
  void run_act(const ActIn& a, float* y, int64_t r0, int64_t r1, float* acc) const;
};

// A norm's weight and eps (and, for a LayerNorm, its bias); a null weight: the layer has no norm there.
struct Norm {
  const float* w = nullptr;
  const float* b = nullptr;  // LayerNorm bias, or none
  bool ln = false;           // LayerNorm (GPT-NeoX): (h - mean) / sqrt(var + eps) * w + b; else an RMSNorm
  float eps = 0;
  bool on() const { return w != nullptr; }
};

// One decoder layer as the step runs it, made from add_layer's named tensors, ints and floats.
struct Layer {
  Norm attn_in, attn_out, mlp_in, mlp_out;  // pre (Llama), sandwich (Gemma: all four), post (OLMo 2)
  float norm_offset = 0;                     // every norm scales by (offset + w): 1 for Gemma's (1 + w)
  Lin q, k, v, o, gate, up, down;            // q/k/v and gate/up may be views of one fused projection
  bool per_head = false;                     // q is GPT-NeoX's whole fused qkv, rows [q_h k_h v_h] per head
  bool gated = true;                         // act(gate) * up; else act(up) (GPT-NeoX: no gate)
  bool parallel = false;                     // h + attn(attn_in(h)) + mlp(mlp_in(h)) (GPT-NeoX)
  const float* gate_thr = nullptr;           // (I,) gate_act site threshold on |act(gate)|, or none
  bool act = false;                          // any activation-sparse kind or site in this layer
  const float *bq = nullptr, *bk = nullptr, *bv = nullptr;  // q, k, v biases (Qwen2), each or none
  Norm qn, kn;                               // q / k norms: (D,) per head or (H*D,) / (KVH*D,) all heads
  int64_t qk_norm = kNoQKNorm;
  int64_t act_fn = kSilu;
  int64_t window = 0;  // sliding window: attend positions (pos - window, pos] (0: all)
  float softcap = 0;   // attention scores -> cap * tanh(scores / cap) (0: none; Gemma 2)
  int64_t rope = 0;    // which of step's cos / sin tables (Gemma 3: local and global)
  // MoE block (decode_moe.cpp; moe false: the gate/up/down MLP above): router (n_exp, C) fp32, top_k
  // experts each a gated MLP of width e_inter (eg/eu/ed per expert); a shared expert of width s_inter
  // (0: none) gated by sigmoid(sgate . x); norm_topk: the top-k probabilities renormalized to sum 1
  bool moe = false, norm_topk = true;
  int64_t n_exp = 0, top_k = 0, e_inter = 0, s_inter = 0;
  const float* router = nullptr;
  std::vector<Lin> eg, eu, ed;
  Lin sg, su, sd, sgate;
};

// Per-thread scratch of the activation-sparse path: up to 3 active-input lists (q, k, v).
struct ActScratch {
  std::vector<int64_t> act[3];
  std::vector<float> xa[3];
};

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

using Tensors = c10::Dict<std::string, at::Tensor>;
using Ints = c10::Dict<std::string, int64_t>;
using Floats = c10::Dict<std::string, double>;

// Named per-layer arguments, each read at most once; unused() lists the names nobody read (a typo).
class Args {
 public:
  Args(const Tensors& t, const Ints& i, const Floats& f, int64_t layer) : t_(t), i_(i), f_(f), layer_(layer) {}
  bool has(const std::string& k) const { return t_.contains(k) || i_.contains(k) || f_.contains(k); }
  const at::Tensor& tensor(const std::string& k);         // required
  const at::Tensor* maybe(const std::string& k);          // optional: nullptr if absent
  int64_t integer(const std::string& k, int64_t dflt);    // optional with a default
  double real(const std::string& k, double dflt);
  std::string unused() const;
  int64_t layer() const { return layer_; }
  std::deque<at::Tensor> kept;  // every tensor read, to keep alive (a deque: references stay valid)

 private:
  const Tensors& t_;
  const Ints& i_;
  const Floats& f_;
  int64_t layer_;
  std::vector<std::string> read_;
};

// decode_lin.cpp: projection `name` (q, k, v, o, gate, up, down, qkv, gate_up) of shape (out, in)
void parse_lin(Args& a, const std::string& name, Lin& lin, int64_t out, int64_t in);
// decode_act.cpp: the calling thread's accumulator for actsparse_bitmask_mv, at least n floats
float* acc_buffer(int64_t n);
// decode_attention.cpp
void rmsnorm(const float* h, const Norm& n, float offset, float* out, int64_t len);
void apply_norm(const float* h, const Norm& n, float offset, float* out, int64_t len);  // RMS or LayerNorm
void qkv_extras(const Layer& ly, float* q, float* k, float* v, int64_t H, int64_t KVH, int64_t D);
void rope(float* x, const float* cos, const float* sin, int64_t D);
float dot(const float* a, const float* b, int64_t n);
float quantize_i8(const float* x, int8_t* codes, int64_t n);

using Scored = std::pair<float, int32_t>;  // (score, page or position)

}  // namespace decode

class DecodeStep : public torch::CustomClassHolder {
 public:
  DecodeStep(int64_t C, int64_t I, int64_t H, int64_t KVH, int64_t D, double scale, at::Tensor k_cache,
             at::Tensor v_cache);
  int64_t add_layer(decode::Tensors tensors, decode::Ints ints, decode::Floats floats);
  at::Tensor step(at::Tensor h, at::Tensor cos, at::Tensor sin, int64_t pos, int64_t mode);
  int64_t num_layers() const { return L_; }
  void set_int8_cache(at::Tensor k_codes, at::Tensor v_codes, at::Tensor k_scale, at::Tensor v_scale);
  void set_quest(int64_t page_size, double keep, int64_t dense_layers, double refine);
  void invalidate(int64_t pos);

 private:
  using Exec = decode::Exec;
  using Layer = decode::Layer;
  using Lin = decode::Lin;
  void run(const Exec& ex, float* H, const float* cos, const float* sin, int64_t pos);
  // decode_act.cpp
  void act_scratch(int nt);
  decode::ActIn gather(const Lin& lin, const float* x, decode::ActScratch& sc, int j) const;
  void project_qkv(const Exec& ex, const Layer& ly, const float* xn);
  void prepare_qk(const Layer& ly, const float* cos, const float* sin);
  void project_add(const Exec& ex, const Lin& lin, const float* x, const decode::Norm& post, float offset, float* H,
                   float* scratch);
  void mlp(const Exec& ex, const Layer& ly, const float* xn);
  void mlp_act(const Exec& ex, const Layer& ly, const float* xn);
  // decode_moe.cpp
  void parse_moe(decode::Args& a, Layer& ly);
  void moe(const Exec& ex, const Layer& ly, const float* xn, float* H, float* scratch);
  // decode_attention.cpp
  void attend(const Exec& ex, int64_t l, const float* q, const float* kc, const float* vc, int64_t p1);
  void attend_int8(const Exec& ex, int64_t l, const float* q, int64_t p1);
  // decode_quest.cpp
  void page_bounds(int64_t l, const float* kc, int64_t p1);
  void quest_head(int64_t l, int64_t hh, const float* qh, const float* K, const float* V, int64_t p1, float* o);
  bool quest_layer(int64_t l) const { return q_page_ > 0 && l >= q_dense_; }

  std::mutex mu_;                    // one step (or setter) at a time: all scratch below is shared
  std::vector<at::Tensor> tensors_;  // keeps every weight, norm, bias and threshold alive
  at::Tensor k_cache_, v_cache_;
  // int8 KV cache (set_int8_cache): codes (L, KVH, T_max, D) and scales (L, KVH, T_max)
  bool int8_ = false;
  at::Tensor kq_, vq_, ks_, vs_;
  std::vector<Layer> layers_;
  int64_t L_ = 0, C_ = 0, I_ = 0, H_ = 0, KVH_ = 0, D_ = 0, Tmax_ = 0, R_ = 1;  // R_: rope tables
  int64_t RD_ = 0;  // rotary dims: the first RD_ of each head (partial rotary, GPT-NeoX), the same in every layer
  float scale_ = 1.0f;
  // per thread: the normed input (xn2_: the MLP's, parallel residual) and the thread's copy of h
  std::vector<std::vector<float>> xn_, xn2_, hp_;
  std::vector<float> raw_;                      // a per-head fused qkv's output rows, before they are split
  std::vector<float> qkv_, att_, tmp_, gu_, act_, scores_;  // gu_: gate rows, then up rows at gu_ + I
  // activation sparsity: whether any layer has it, per-thread active-input lists, gate_act keep flags,
  // accumulator size for actsparse_bitmask_mv
  bool any_act_ = false;
  std::vector<decode::ActScratch> scratch_;
  std::vector<uint8_t> keep_;
  int64_t acc_n_ = 0;
  // MoE: gate, up and act rows of the chosen experts and the shared one ([e_1 | ... | e_k | shared], each
  // segment zero-padded), the weighted sum of their down projections and one down projection's rows
  std::vector<float> moe_g_, moe_u_, moe_a_, moe_y_, moe_t_;
  // Quest: page size (0: off), budget, dense layers, refine; page bounds (L, KVH, Pmax, D) and how many
  // pages of each layer they hold; per-head scratch (H, T_max) of scored pages and positions
  int64_t q_page_ = 0, q_dense_ = 0, Pmax_ = 0;
  double q_keep_ = 1.0, q_refine_ = 1.0;
  std::vector<float> kmin_, kmax_;
  std::vector<int64_t> pages_done_;
  std::vector<decode::Scored> cand_, tok_;
};

}  // namespace sparseland
