"""``SparseLinear`` and ``to_sparse_runtime_``: swap a model's Linear layers for runtime formats in place.

    report = to_sparse_runtime_(model, format="auto", value_dtype="float32")

Decode (a few rows) runs the C++ kernels. Long prefills (more than ``DENSE_ROWS`` rows) of the float
formats rebuild the dense weight for the call and use torch's GEMM, which is compute-bound and faster
there; the quantized formats (``runtime/quantized.py``) run their own several-row kernels, which read
each weight row once for many input rows.

A Linear quantized with ``sparseland.quant`` (it carries a ``QuantizedWeight``) becomes a quantized
format under ``format="auto"``: 4-bit dense, 8-bit dense, or 4-bit values of a 2:4 / unstructured mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from sparseland.quant.apply import quant_state
from sparseland.runtime.formats import DenseFormat, WeightFormat, make_act_format, make_format, value_dtype_of
from sparseland.runtime.quantized import QUANT_FORMATS, make_quant_format

DENSE_ROWS = 32


class SparseLinear(torch.nn.Module):
    """A Linear layer whose weight lives in a runtime format (no dense copy kept)."""

    def __init__(self, weight: WeightFormat, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight_format = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else torch.nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(
        cls, linear: torch.nn.Linear, format: str = "auto", value_dtype: torch.dtype = torch.float32
    ) -> SparseLinear:
        return cls(make_format(linear.weight.data, format, value_dtype), linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight (rebuilt on every access; for inspection, not for speed)."""
        return self.weight_format.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        if x2.shape[0] > DENSE_ROWS and not getattr(self.weight_format, "multi_row_kernel", False):
            y = torch.nn.functional.linear(x2.float(), self.weight_format.to_dense().float())
        else:
            y = self.weight_format.matmul(x2)  # (rows, out) float32
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*lead, self.out_features)

    def nbytes(self) -> int:
        return self.weight_format.nbytes()

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, format={self.weight_format.name}"


@dataclass
class RuntimeReport:
    replaced: int
    formats: dict[str, int]
    dense_bytes: int  # the replaced weights before (in their original dtype)
    runtime_bytes: int  # the replaced weights after

    @property
    def ratio(self) -> float:
        return self.runtime_bytes / max(1, self.dense_bytes)


def _default_filter(module: torch.nn.Module, name: str) -> bool:
    return isinstance(module, torch.nn.Linear) and not name.endswith("lm_head")


def activation_sparse_layers(model: torch.nn.Module) -> tuple[set[str], set[str]]:
    """``(actsparse, keep_linear)`` from the model's activation sparsity (``sparseland.activations``):
    Linear names whose input is made sparse -- thresholded or top-k inputs, and the down projection
    after a sparsified MLP gate -- and the R-Sparse sites, which need the dense weight and stay Linear."""
    from sparseland.activations.sites import get_state

    state = get_state(model)
    if state is None:
        return set(), set()
    act, keep = set(), set()
    for site in state.sites:
        if site.lr_a is not None:
            keep.add(site.module)
        elif site.where == "input":
            act.add(site.module)
        else:  # gate_act: act(gate) * up is the down projection's input
            mlp = site.module.rpartition(".")[0]
            act.add(f"{mlp}.down_proj" if mlp else "down_proj")
    return act - keep, keep


def to_sparse_runtime_(
    model: torch.nn.Module,
    format: str = "auto",
    value_dtype: str | torch.dtype = "float32",
    filter_fn: Callable[[torch.nn.Module, str], bool] | None = None,
    lm_head_dtype: str | torch.dtype | None = None,
    activation_sparse: bool = True,
) -> RuntimeReport:
    """Replace Linear layers (default: all but lm_head) by ``SparseLinear`` in place.

    ``format``: auto (N:M if exact, else bitmask if smaller, else dense), dense, bitmask, 2:4, 4:8,
    actsparse, actsparse_bitmask; for a quantized Linear, auto picks its quantized format (q4, q8, q4_nm,
    q4_bitmask). A quantized lm_head (or one tied to quantized embeddings) runs its quantized format
    unless ``lm_head_dtype`` names a float dtype. ``lm_head_dtype`` (float32/bfloat16): also run lm_head on the dense
    kernel in that dtype (a bfloat16 copy unties it from the embeddings; float32 shares their storage).
    ``activation_sparse``: if the model carries activation sparsity (``sparsify_`` with a TEAL, CATS,
    CHESS or WINA config), the layers whose inputs it zeroes get an activation-sparse format (skipping
    the weight rows of zero inputs) and its hooks move to the new modules: ``actsparse_bitmask`` (which
    also skips zero weights) where it is smaller than ``actsparse`` -- a pruned weight -- else
    ``actsparse``; ``format="actsparse"`` or ``"actsparse_bitmask"`` forces one of the two there.
    """
    from sparseland.activations.sites import get_state, install, remove

    vdt = value_dtype_of(value_dtype)
    keep = filter_fn or _default_filter
    act_layers, keep_linear = activation_sparse_layers(model) if activation_sparse else (set(), set())
    state = get_state(model)
    if state is not None:
        remove(model)  # hooks hang on the old modules; reinstalled on the new ones below
    targets = [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and keep(m, n) and n not in keep_linear
    ]
    formats: dict[str, int] = {}
    dense_bytes = runtime_bytes = 0
    for name, lin in targets:
        qw = quant_state(lin)
        if name in act_layers and format not in ("actsparse", "actsparse_bitmask"):
            new = SparseLinear(make_act_format(lin.weight.data, vdt), lin.bias)
        elif qw is not None and format in ("auto", *QUANT_FORMATS):
            new = SparseLinear(make_quant_format(qw, format), lin.bias)
        else:
            new = SparseLinear.from_linear(lin, format, vdt)
        _set_module(model, name, new)
        formats[new.weight_format.name] = formats.get(new.weight_format.name, 0) + 1
        dense_bytes += lin.weight.numel() * lin.weight.element_size()
        runtime_bytes += new.nbytes()
    head = model.get_output_embeddings()
    head_q = output_quant_state(model)
    if head_q is not None and lm_head_dtype in (None, "auto", "quant") and isinstance(head, torch.nn.Linear):
        model.set_output_embeddings(SparseLinear(make_quant_format(head_q), head.bias))
    elif lm_head_dtype not in (None, "auto", "quant") and isinstance(head, torch.nn.Linear):
        dt = value_dtype_of(lm_head_dtype)
        model.set_output_embeddings(SparseLinear(DenseFormat.from_dense(head.weight.data, dt), head.bias))
    if state is not None:
        install(model, state.config, state.sites)
    return RuntimeReport(len(targets), formats, dense_bytes, runtime_bytes)


def output_quant_state(model: torch.nn.Module):
    """The ``QuantizedWeight`` of the lm_head: its own, or that of the embeddings it is tied to."""
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return None
    qw = quant_state(head)
    if qw is None and emb is not None and head.weight is emb.weight:
        qw = quant_state(emb)
    return qw


def _set_module(root: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def weight_bytes(model: torch.nn.Module, include_lm_head: bool = True) -> int:
    """Bytes of the weights read per decoded token: every Linear / SparseLinear (embeddings excluded:
    a token reads one row). A tied lm_head counts once, as the lm_head."""
    total = 0
    for name, m in model.named_modules():
        if name.endswith("lm_head") and not include_lm_head:
            continue
        if isinstance(m, SparseLinear):
            total += m.nbytes()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
    return total


def model_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the model: parameters, buffers and runtime formats, shared storage counted once."""
    seen: set[int] = set()
    total = 0
    tensors = [*model.parameters(), *model.buffers()]
    for m in model.modules():
        if isinstance(m, SparseLinear):
            f = m.weight_format
            tensors += [getattr(f, k) for k in f.__dataclass_fields__ if isinstance(getattr(f, k), torch.Tensor)]
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
