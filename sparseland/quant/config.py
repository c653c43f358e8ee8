"""``QuantConfig``: quantize a model's weights in place with ``sparsify_``, alone or on top of pruning.

    sparsify_(model, QuantConfig(scheme="int4-g32"))                                  # round to nearest
    sparsify_(model, QuantConfig(scheme="int4-g64", method="gptq"), calibration=calib)  # GPTQ
    sparsify_(model, SparseGPTConfig(sparsity=0.5, quant="int4-g64"), calibration=calib)  # joint

The model stays a normal float model whose weights hold the dequantized values (so perplexity and
generation work unchanged); each quantized module carries its ``QuantizedWeight`` (codes, scales, mask)
for checkpoints and the runtime (``quant_state(module)``).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from sparseland.config import SparsityConfig, check_fraction
from sparseland.errors import SparselandError
from sparseland.quant.scheme import QuantScheme

METHODS = ("rtn", "gptq")


@dataclasses.dataclass
class QuantConfig(SparsityConfig):
    """Weight quantization of the decoder blocks' Linear layers (and optionally the embeddings / tied
    lm_head). ``method``: ``rtn`` (round to nearest, no data) or ``gptq`` (GPTQ, Frantar et al. 2023:
    quantize column by column and spread each column's error over the later ones through the inverse
    Hessian of the calibration inputs). A weight with at least ``sparse_threshold`` zeros keeps them as
    a mask (sparse + quantized): its zeros stay exact and do not count when choosing scales.
    ``embeddings``: a scheme for the token embeddings (and the lm_head tied to them), or None to keep
    them in float."""

    kind: ClassVar[str] = "quant"
    scheme: str = "int4-g32"
    method: str = "rtn"
    embeddings: str | None = None
    sparse_threshold: float = 0.1
    blocksize: int = 128
    percdamp: float = 0.01

    def validate(self) -> None:
        self.scheme = QuantScheme.parse(self.scheme).name
        if self.embeddings is not None:
            self.embeddings = QuantScheme.parse(self.embeddings).name
        if self.method not in METHODS:
            raise SparselandError(f"method={self.method!r} is not one of {METHODS}")
        check_fraction("sparse_threshold", self.sparse_threshold, allow_one=True)
        if not (isinstance(self.blocksize, int) and self.blocksize > 0):
            raise SparselandError(f"blocksize={self.blocksize!r} must be a positive integer (128 in the paper)")
        if not self.percdamp > 0:
            raise SparselandError(f"percdamp={self.percdamp!r} must be positive (0.01 in the paper)")

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"

    @property
    def quant_scheme(self) -> QuantScheme:
        return QuantScheme.parse(self.scheme)
