// Registers sparseland's kernels as torch ops in the `sparseland` namespace (torch.ops.sparseland.*).
#include <Python.h>
#include <torch/library.h>
#include "common.h"

namespace sparseland {

const ExpandLUT& expand_lut() {
  static const ExpandLUT lut;
  return lut;
}
const CompressLUT& compress_lut() {
  static const CompressLUT lut;
  return lut;
}

at::Tensor dense_mm(at::Tensor w, at::Tensor x);
at::Tensor bitmask_mm(at::Tensor mask, at::Tensor row_ptr, at::Tensor values, at::Tensor x);
at::Tensor nm4_mm(at::Tensor mask, at::Tensor values, at::Tensor x);
at::Tensor actsparse_mm(at::Tensor wt, at::Tensor x);
at::Tensor block_sparse_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor block_mask, int64_t block_size,
                                  double scale);
at::Tensor sparse_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor indices,
                                   double scale);
at::Tensor dense_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, double scale);

}  // namespace sparseland

TORCH_LIBRARY(sparseland, m) {
  m.def("dense_mm(Tensor w, Tensor x) -> Tensor", &sparseland::dense_mm);
  m.def("bitmask_mm(Tensor mask, Tensor row_ptr, Tensor values, Tensor x) -> Tensor", &sparseland::bitmask_mm);
  m.def("nm4_mm(Tensor mask, Tensor values, Tensor x) -> Tensor", &sparseland::nm4_mm);
  m.def("actsparse_mm(Tensor wt, Tensor x) -> Tensor", &sparseland::actsparse_mm);
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor block_mask, int block_size, float scale) -> Tensor",
        &sparseland::block_sparse_attention);
  m.def("sparse_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor indices, float scale) -> Tensor",
        &sparseland::sparse_decode_attention);
  m.def("dense_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, float scale) -> Tensor",
        &sparseland::dense_decode_attention);
}

// A plain Python module: importing it runs the registration above.
static struct PyModuleDef sparseland_module = {PyModuleDef_HEAD_INIT, "_C", "sparseland CPU kernels (torch.ops.sparseland)",
                                               -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sparseland_module); }
