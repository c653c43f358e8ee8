// The fused decode step's weight kinds: each projection's named tensors checked against its shape and
// run by its kind's kernel (matvec.h, actsparse_mv.h, qmatvec.h, qsparse.h).
//
// Names per kind, for projection p (p.kind the kind, p.thr an optional input-site threshold (in,)):
//   0 dense: p.w (out, in) fp32/bf16        1 bitmask: p.mask, p.row_ptr, p.values
//   2 nm (4 kept per mask byte): p.mask, p.values
//   3 actsparse: p.w = W^T (in, out)        4 actsparse_bitmask: p.mask (in, ceil(out/8)), p.row_ptr, p.values
//   5 q4: p.codes, p.scale, [p.offset]      6 q8: p.codes, p.scale (out, 1 or in / group)
//   7 q4_nm: p.mask, p.codes, p.scale, [p.offset]   8 q4_bitmask: p.mask, p.row_ptr, p.codes, p.scale, [p.offset]
#include <sstream>

#include "actsparse_mv.h"
#include "decode_step.h"
#include "matvec.h"
#include "qmatvec.h"
#include "qsparse.h"

namespace sparseland {
namespace decode {

void Lin::run(const float* x, float* y, int64_t r0, int64_t r1) const {
  if (r0 >= r1) return;
  if (bias != nullptr) {  // y[r] = (W x)[r] + bias[r] over the view's rows
    Lin plain = *this;
    plain.bias = nullptr;
    plain.run(x, y, r0, r1);
    for (int64_t r = r0; r < r1; ++r) y[r] += bias[r];
    return;
  }
  y -= off, r0 += off, r1 += off;  // a view: its rows are rows [off, off + out) of the packed matrix
  if (kind == kDense) {
    if (bf16) dense_mv(static_cast<const at::BFloat16*>(w), x, y, in, r0, r1);
    else dense_mv(static_cast<const float*>(w), x, y, in, r0, r1);
  } else if (kind == kQ4) {
    q4_mv(static_cast<const uint8_t*>(w), scale, offset, in, group, x, y, r0, r1);
  } else if (kind == kQ8) {
    q8_mv(static_cast<const int8_t*>(w), scale, in, group == in ? 0 : group, x, y, r0, r1);
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

void Lin::run_act(const ActIn& a, float* y, int64_t r0, int64_t r1, float* acc) const {
  r0 = align16(r0, out), r1 = align16(r1, out);
  if (r0 >= r1) return;
  if (kind == kAct) {
    if (bf16) actsparse_mv(static_cast<const at::BFloat16*>(w), a.act, a.xa, a.na, y, out, r0, r1);
    else actsparse_mv(static_cast<const float*>(w), a.act, a.xa, a.na, y, out, r0, r1);
  } else {
    if (bf16)
      actsparse_bitmask_mv(mask, row_ptr, static_cast<const at::BFloat16*>(w), a.act, a.xa, a.na, y, out, r0, r1, acc);
    else actsparse_bitmask_mv(mask, row_ptr, static_cast<const float*>(w), a.act, a.xa, a.na, y, out, r0, r1, acc);
  }
}

const at::Tensor& Args::tensor(const std::string& k) {
  const at::Tensor* t = maybe(k);
  TORCH_CHECK(t != nullptr, "DecodeStep.add_layer: layer ", layer_, " needs tensor '", k, "'");
  return *t;
}

const at::Tensor* Args::maybe(const std::string& k) {
  auto it = t_.find(k);
  if (it == t_.end()) return nullptr;
  read_.push_back(k);
  kept.push_back(it->value());
  return &kept.back();
}

int64_t Args::integer(const std::string& k, int64_t dflt) {
  auto it = i_.find(k);
  if (it == i_.end()) return dflt;
  read_.push_back(k);
  return it->value();
}

double Args::real(const std::string& k, double dflt) {
  auto it = f_.find(k);
  if (it == f_.end()) return dflt;
  read_.push_back(k);
  return it->value();
}

std::string Args::unused() const {
  std::ostringstream s;
  auto add = [&](const std::string& k) {
    if (std::find(read_.begin(), read_.end(), k) == read_.end()) s << " '" << k << "'";
  };
  for (const auto& kv : t_) add(kv.key());
  for (const auto& kv : i_) add(kv.key());
  for (const auto& kv : f_) add(kv.key());
  return s.str();
}

namespace {

void set_values(Lin& lin, const at::Tensor& v) {
  TORCH_CHECK(v.is_contiguous(), "DecodeStep: weight values must be contiguous");
  if (v.scalar_type() == at::kFloat) lin.w = v.data_ptr<float>(), lin.bf16 = false;
  else if (v.scalar_type() == at::kBFloat16) lin.w = v.data_ptr<at::BFloat16>(), lin.bf16 = true;
  else TORCH_CHECK(false, "DecodeStep: weight values must be float32 or bfloat16");
}

// The optional float16 offsets of a q4 kind, shaped like its scales.
void set_offset(Lin& lin, const at::Tensor* offset, const at::Tensor& scale, const std::string& p, int64_t l) {
  if (offset == nullptr || offset->numel() == 0) return;
  TORCH_CHECK(offset->scalar_type() == at::kHalf && offset->is_contiguous() && offset->sizes() == scale.sizes(),
              "DecodeStep: layer ", l, " ", p, ": offset must be float16 shaped like scale");
  lin.offset = offset->data_ptr<at::Half>();
}

// A dense quantized kind's codes, scales and (q4) offsets, checked against the shape (qmatvec.h).
void parse_quant(Args& a, const std::string& p, Lin& lin) {
  const bool q4 = lin.kind == kQ4;
  const at::Tensor& codes = a.tensor(p + ".codes");
  const at::Tensor& scale = a.tensor(p + ".scale");
  TORCH_CHECK(scale.scalar_type() == at::kHalf && scale.is_contiguous() && scale.dim() == 2 &&
                  scale.size(0) == lin.out && scale.size(1) > 0 && lin.in % scale.size(1) == 0,
              "DecodeStep: layer ", a.layer(), " ", p, ": scale must be contiguous float16 (out, in / group)");
  lin.group = lin.in / scale.size(1);
  TORCH_CHECK(!q4 || (lin.group % 32 == 0 && lin.group <= 128), "DecodeStep: q4 group must be 32, 64 or 128");
  TORCH_CHECK(q4 || scale.size(1) == 1 || (lin.group % 32 == 0 && lin.group <= 128),
              "DecodeStep: q8 needs one scale per row or per group of 32, 64 or 128");
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 2 && codes.size(0) == lin.out &&
                  codes.size(1) == (q4 ? lin.in / 2 : lin.in) && codes.scalar_type() == (q4 ? at::kByte : at::kChar),
              "DecodeStep: layer ", a.layer(), " ", p, ": codes must be contiguous ", q4 ? "uint8 (out, in/2)" : "int8 (out, in)");
  lin.w = codes.data_ptr();
  lin.scale = scale.data_ptr<at::Half>();
  if (q4) set_offset(lin, a.maybe(p + ".offset"), scale, p, a.layer());
}

// mask, [row_ptr], codes, scale, [offset] of q4_nm / q4_bitmask: the shapes that bound every read
// (qsparse.py checks the rest when the format is made).
void parse_q4_sparse(Args& a, const std::string& p, Lin& lin) {
  const at::Tensor& m = a.tensor(p + ".mask");
  TORCH_CHECK(m.scalar_type() == at::kByte && m.is_contiguous() && m.dim() == 2 && m.size(0) == lin.out &&
                  m.size(1) * 8 == lin.in && lin.in % 32 == 0,
              "DecodeStep: layer ", a.layer(), " ", p, ": q4 sparse mask must be contiguous uint8 (out, in/8)");
  lin.mask = m.data_ptr<uint8_t>();
  const at::Tensor* rp = lin.kind == kQ4Bitmask ? &a.tensor(p + ".row_ptr") : nullptr;
  const at::Tensor& codes = a.tensor(p + ".codes");
  const at::Tensor& scale = a.tensor(p + ".scale");
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
  set_offset(lin, a.maybe(p + ".offset"), scale, p, a.layer());
}

// The bitmask / N:M float kinds, row-major (out, ceil(in/8)) masks.
void parse_sparse(Args& a, const std::string& p, Lin& lin) {
  const at::Tensor& m = a.tensor(p + ".mask");
  TORCH_CHECK(m.scalar_type() == at::kByte && m.is_contiguous() && m.dim() == 2 && m.size(0) == lin.out &&
                  m.size(1) == lin.in8,
              "DecodeStep: layer ", a.layer(), " ", p, ": mask must be contiguous uint8 (out, ceil(in/8))");
  lin.mask = m.data_ptr<uint8_t>();
  if (lin.kind == kBitmask) {
    const at::Tensor& rp = a.tensor(p + ".row_ptr");
    TORCH_CHECK(rp.scalar_type() == at::kLong && rp.is_contiguous() && rp.numel() == lin.out + 1,
                "DecodeStep: bitmask row_ptr must be int64 (out + 1,)");
    lin.row_ptr = rp.data_ptr<int64_t>();
    const at::Tensor& v = a.tensor(p + ".values");
    TORCH_CHECK(v.numel() >= rp[lin.out].item<int64_t>() + 8, "DecodeStep: values need 8 zeros of padding");
    set_values(lin, v);
  } else {
    const at::Tensor& v = a.tensor(p + ".values");
    TORCH_CHECK(v.numel() >= lin.out * lin.in8 * 4 + 8, "DecodeStep: N:M values too short");
    set_values(lin, v);
  }
}

// ActSparseBitmaskFormat: W^T's mask (in, ceil(out/8)), row_ptr (in + 1,), padded values.
void parse_act_bitmask(Args& a, const std::string& p, Lin& lin) {
  const int64_t out8 = (lin.out + 7) / 8;
  const at::Tensor& m = a.tensor(p + ".mask");
  TORCH_CHECK(m.scalar_type() == at::kByte && m.is_contiguous() && m.dim() == 2 && m.size(0) == lin.in &&
                  m.size(1) == out8,
              "DecodeStep: layer ", a.layer(), " ", p, ": mask must be contiguous uint8 (in, ceil(out/8))");
  lin.mask = m.data_ptr<uint8_t>();
  const at::Tensor& rp = a.tensor(p + ".row_ptr");
  TORCH_CHECK(rp.scalar_type() == at::kLong && rp.is_contiguous() && rp.numel() == lin.in + 1,
              "DecodeStep: actsparse_bitmask row_ptr must be int64 (in + 1,)");
  lin.row_ptr = rp.data_ptr<int64_t>();
  const at::Tensor& v = a.tensor(p + ".values");
  TORCH_CHECK(v.dim() == 1 && v.numel() >= rp[lin.in].item<int64_t>() + 8,
              "DecodeStep: values need 8 zeros of padding");
  set_values(lin, v);
}

}  // namespace

void parse_lin(Args& a, const std::string& p, Lin& lin, int64_t out, int64_t in) {
  const std::string where = "layer " + std::to_string(a.layer()) + " " + p;
  lin.kind = a.integer(p + ".kind", -1);
  lin.out = out, lin.in = in, lin.in8 = (in + 7) / 8, lin.off = 0;
  if (lin.kind == kDense || lin.kind == kAct) {
    const at::Tensor& w = a.tensor(p + ".w");
    const bool t = lin.kind == kAct;  // actsparse: W^T (in, out)
    TORCH_CHECK(w.is_contiguous() && w.dim() == 2 && w.size(0) == (t ? in : out) && w.size(1) == (t ? out : in),
                "DecodeStep: ", where, ": ", t ? "actsparse weight must be contiguous W^T (" : "dense weight must be "
                "contiguous (", t ? in : out, ", ", t ? out : in, ")");
    set_values(lin, w);
  } else if (lin.kind == kBitmask || lin.kind == kNM4) {
    parse_sparse(a, p, lin);
  } else if (lin.kind == kActBitmask) {
    parse_act_bitmask(a, p, lin);
  } else if (lin.kind == kQ4 || lin.kind == kQ8) {
    parse_quant(a, p, lin);
  } else if (lin.kind == kQ4NM || lin.kind == kQ4Bitmask) {
    parse_q4_sparse(a, p, lin);
  } else {
    TORCH_CHECK(false, "DecodeStep: ", where, ": unknown or missing weight kind ", lin.kind, " ('", p, ".kind')");
  }
  if (const at::Tensor* t = a.maybe(p + ".thr")) {
    TORCH_CHECK(lin.act(), "DecodeStep: ", where, ": an input threshold needs an activation-sparse kind (3 or 4)");
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == in, "DecodeStep: ", where,
                ": input threshold must be contiguous float32 with ", in, " elements");
    lin.thr = t->data_ptr<float>();
  }
}

}  // namespace decode
}  // namespace sparseland
