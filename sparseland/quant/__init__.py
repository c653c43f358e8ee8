"""Quantization of weights, alone or stacked on sparsity: schemes, quantizers (round-to-nearest, GPTQ,
SparseGPT's joint prune + quantize) and the config that applies them with ``sparsify_``::

    sparsify_(model, QuantConfig(scheme="int4-g32"))
"""

from sparseland.quant.apply import QuantReport, attach, quant_state, quantize_embeddings_, quantize_model
from sparseland.quant.config import QuantConfig
from sparseland.quant.scheme import QuantizedWeight, QuantScheme, dequantize, quantize_rtn

__all__ = [
    "QuantConfig",
    "QuantReport",
    "QuantScheme",
    "QuantizedWeight",
    "attach",
    "dequantize",
    "quant_state",
    "quantize_embeddings_",
    "quantize_model",
    "quantize_rtn",
]
