"""Quantization of weights, alone or stacked on sparsity: schemes, quantizers (round-to-nearest, GPTQ,
SparseGPT's joint prune + quantize) and the config that applies them with ``sparsify_``."""

from sparseland.quant.scheme import QuantizedWeight, QuantScheme, dequantize, quantize_rtn

__all__ = ["QuantScheme", "QuantizedWeight", "dequantize", "quantize_rtn"]
