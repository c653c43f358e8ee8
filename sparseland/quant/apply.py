"""The driver of ``QuantConfig``: which modules are quantized, with what, and where the result lives.

A quantized module keeps a float weight equal to ``QuantizedWeight.dequantize()`` (bit for bit) and
the ``QuantizedWeight`` itself as ``module._sparseland_quant``. ``quant_state`` returns it only while
the weight still equals it (a weight changed afterwards, by fine-tuning say, is no longer quantized).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from sparseland.api import FilterFn, register
from sparseland.errors import SparselandError
from sparseland.quant.config import QuantConfig
from sparseland.quant.scheme import QuantizedWeight, QuantScheme, quantize_rtn

ATTR = "_sparseland_quant"


@dataclass
class QuantReport:
    scheme: str
    method: str
    layers: int = 0
    sparse_layers: int = 0  # quantized with a mask (their zeros kept)
    embeddings: str | None = None
    bits_per_weight: float = 0.0  # storage of the quantized Linear weights (codes + scales + masks)
    seconds: float = 0.0
    layer_scheme: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def attach(module: torch.nn.Module, qw: QuantizedWeight, weight_name: str = "weight") -> None:
    """Make ``module``'s weight the dequantized ``qw`` and remember ``qw``."""
    w = getattr(module, weight_name)
    if tuple(w.shape) != qw.shape:
        raise SparselandError(f"quantized weight has shape {qw.shape}, the module's is {tuple(w.shape)}")
    with torch.no_grad():
        w.data.copy_(qw.dequantize().to(w.dtype))
    setattr(module, ATTR, qw)


def quant_state(module: torch.nn.Module, weight_name: str = "weight") -> QuantizedWeight | None:
    """The module's ``QuantizedWeight`` if it has one and its float weight still equals it, else None."""
    qw = getattr(module, ATTR, None)
    if qw is None:
        return None
    w = getattr(module, weight_name, None)
    if not isinstance(w, torch.Tensor) or w.dtype != torch.float32 or not torch.equal(w.detach(), qw.dequantize()):
        return None
    return qw


def sparse_mask(w: torch.Tensor, threshold: float) -> torch.Tensor | None:
    """The weight's zeros as a mask when they are at least ``threshold`` of it, else None (dense)."""
    nz = w != 0
    return nz if (1.0 - float(nz.float().mean())) >= threshold and threshold < 1.0 else None


def _decoder_linears(model: torch.nn.Module, filter_fn: FilterFn | None) -> dict[str, torch.nn.Linear]:
    from sparseland.weights.pruner import block_linears, block_prefix, decoder_layers

    out: dict[str, torch.nn.Linear] = {}
    for i, block in enumerate(decoder_layers(model)):
        out.update(block_linears(block, block_prefix(model, i), filter_fn))
    return out


def quantize_embeddings_(model: torch.nn.Module, scheme: QuantScheme | str) -> QuantizedWeight:
    """Quantize the input embeddings (and with them an lm_head tied to them) round-to-nearest."""
    emb = model.get_input_embeddings()
    qw = quantize_rtn(emb.weight.data, scheme)
    attach(emb, qw)
    head = model.get_output_embeddings()
    if head is not None and head.weight is not emb.weight:
        attach(head, quantize_rtn(head.weight.data, scheme))
    return qw


@torch.no_grad()
def quantize_model(
    model: torch.nn.Module,
    config: QuantConfig,
    calibration: torch.Tensor | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = True,
) -> QuantReport:
    """Quantize the decoder blocks' Linear weights of ``model`` in place (see the module docstring)."""
    start = time.perf_counter()
    scheme = config.quant_scheme
    report = QuantReport(scheme=scheme.name, method=config.method, embeddings=config.embeddings)
    linears = _decoder_linears(model, filter_fn)
    for mod in linears.values():
        scheme.group_size(mod.in_features)  # fail before any work on a shape the scheme cannot cover
    bits = weights = 0

    def quantize(name: str, mod: torch.nn.Linear, stats=None) -> None:
        nonlocal bits, weights
        W = mod.weight.data
        mask = sparse_mask(W, config.sparse_threshold)
        if config.method == "gptq":
            from sparseland.quant.gptq import gptq_quantize
            from sparseland.weights.pruner import num_threads

            with num_threads(1):
                qw = gptq_quantize(W, stats.gram, scheme, config.blocksize, config.percdamp, mask=mask)
        else:
            qw = quantize_rtn(W, scheme, mask)
        attach(mod, qw)
        report.layers += 1
        report.sparse_layers += mask is not None
        report.layer_scheme[name] = scheme.name + ("+mask" if mask is not None else "")
        bits += qw.nbytes() * 8
        weights += W.numel()

    if config.method == "gptq":
        _gptq_blocks(model, config, calibration, filter_fn, quantize, progress)
    else:
        for name, mod in tqdm(linears.items(), desc=f"quantize {scheme.name}", unit="layer", disable=not progress):
            quantize(name, mod)
    if config.embeddings is not None:
        quantize_embeddings_(model, config.embeddings)
    report.bits_per_weight = bits / max(weights, 1)
    report.seconds = time.perf_counter() - start
    return report


def _gptq_blocks(model, config: QuantConfig, calibration, filter_fn, quantize, progress: bool) -> None:
    """Block by block with the pruning driver: each Linear is quantized just before it runs, from the
    X^T X of its inputs (made by the already-quantized Linears before it)."""
    from sparseland.weights.pruner import (
        block_linears,
        block_prefix,
        capture_block_inputs,
        decoder_layers,
        prune_block_in_one_pass,
    )

    if calibration is None or not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
        raise SparselandError(
            "QuantConfig(method='gptq') needs calibration data: pass calibration=corpus.calibration(32, 512) "
            "(a (N, T) LongTensor of token windows), or use method='rtn'"
        )
    layers = decoder_layers(model)
    was_training = model.training
    model.eval()
    batches = capture_block_inputs(model, layers, calibration, batch_size=calibration.shape[0])
    for i, block in enumerate(tqdm(layers, desc=f"gptq {config.scheme}", unit="block", disable=not progress)):
        linears = block_linears(block, block_prefix(model, i), filter_fn)
        batches = prune_block_in_one_pass(block, linears, batches, True, quantize)
    model.train(was_training)


register(QuantConfig)(quantize_model)
