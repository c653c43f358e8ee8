"""Frontier runners: how each method of a grid cell is applied (``Runner``), the table of them
(``RUNNERS``, filled from ``sparseland.registry``) and combinations of different families (``a+b``)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sparseland.bench.cells import Cell, Workload
from sparseland.errors import SparselandError


def _jsonable(value: Any) -> Any:
    """A JSON-safe copy of a method's report (``to_dict`` objects and dataclasses are converted)."""
    if value is None:
        return None
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


@dataclass(frozen=True)
class Runner:
    """How to apply one method: ``apply(model, cell, workload)`` edits the model in place and may
    return a JSON-able report. ``version`` is part of the cell key: bump it when the method changes."""

    apply: Callable[[torch.nn.Module, Cell, Workload], Any]
    version: str = "1"
    family: str = "weights"
    nm_patterns: bool = True  # False: the grid gives this method unstructured cells only
    parts: tuple[str, ...] = ()  # the families a combined runner applies, in order
    quant_scheme: str | None = None  # quant runners: the scheme (a weights+quant combination prunes and quantizes)
    sparsity_free: bool = False  # the grid gives this method one cell, whatever the sparsities

    @property
    def families(self) -> tuple[str, ...]:
        return self.parts or (self.family,)


RUNNERS: dict[str, Runner] = {}


def register_runner(method: str, runner: Runner) -> None:
    """Make ``method`` usable in grid cells (replaces an earlier runner of that name)."""
    RUNNERS[method] = runner


def get_runner(method: str) -> Runner:
    """The runner of ``method``; ``"a+b"`` combines registered runners of different families (e.g.
    ``wanda+teal``: Wanda weights, then TEAL activations calibrated on the pruned model)."""
    if method not in RUNNERS and "+" in method:
        return _combined_runner(method)
    if method not in RUNNERS:
        raise SparselandError(
            f"unknown frontier method {method!r}; known: {', '.join(sorted(RUNNERS))}, "
            "or a combination of different families joined by '+' (e.g. wanda+teal)"
        )
    return RUNNERS[method]


FAMILY_ORDER = ("weights", "quant", "activations", "attention")  # a combination applies its parts in this order


def _combined_runner(method: str) -> Runner:
    """One runner applying each part of ``"a+b[+c]"`` to the same model with the cell's sparsity: weights
    first (so activation thresholds are calibrated on the pruned model), then activations, then attention."""
    names = [n.strip() for n in method.split("+")]
    if any(not n for n in names):
        raise SparselandError(f"method {method!r} has an empty part; write combinations like wanda+teal")
    runners = {n: get_runner(n) for n in names}
    families = [runners[n].family for n in names]
    if any(f not in FAMILY_ORDER for f in families) or len(set(families)) != len(families):
        raise SparselandError(
            f"method {method!r} combines {', '.join(f'{n} ({f})' for n, f in zip(names, families, strict=True))}; "
            "a combination takes at most one method per family (weights, activations, attention), e.g. wanda+teal"
        )
    order = sorted(names, key=lambda n: FAMILY_ORDER.index(runners[n].family))
    version = "+".join(f"{n}:{runners[n].version}" for n in order)
    quant = next((runners[n] for n in order if runners[n].family == "quant"), None)
    joint = quant is not None and "weights" in families  # prune + quantize in one pass (SparseGPT: jointly)
    if joint:
        order = [n for n in order if runners[n].family != "quant"]

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        reports = {}
        for n in order:
            part = cell if runners[n].family == "weights" else dataclasses.replace(cell, pattern="unstructured")
            if joint and runners[n].family == "weights":
                part = dataclasses.replace(part, options={**part.options, "quant": quant.quant_scheme})
            reports[n] = _jsonable(runners[n].apply(model, dataclasses.replace(part, method=n), workload))
        return reports

    weights = [runners[n] for n in order if runners[n].family == "weights"]
    return Runner(
        apply=apply,
        version=version,
        family="combined",
        nm_patterns=bool(weights) and weights[0].nm_patterns,
        parts=tuple(runners[n].family for n in order),
    )


def _weights_runner(method: str) -> Runner:
    """A runner for a weight-pruning method of the registry (``sparseland.registry``); the cell's
    pattern and options (and the workload's seed) go into its config."""

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        from sparseland.api import sparsify_
        from sparseland.registry import make_config

        config = make_config(method, cell.sparsity, pattern=cell.pattern, **{"seed": workload.seed, **cell.options})
        needs = getattr(config, "uses_calibration", getattr(config, "needs_calibration", True))
        return sparsify_(model, config, calibration=workload.calibration() if needs else None)

    return Runner(apply=apply, version="1", family="weights")


def _activation_runner(method: str) -> Runner:
    """A runner for an activation-sparsity method of the registry; its cells are unstructured only, and
    the sparsity is the fraction of zeroed activations the method targets."""

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        from sparseland.api import sparsify_
        from sparseland.registry import make_config

        config = make_config(method, cell.sparsity, **cell.options)
        return sparsify_(model, config, calibration=workload.calibration())

    return Runner(apply=apply, version="1", family="activations", nm_patterns=False)


def _quant_runner(method: str) -> Runner:
    """A runner for weight quantization of the registry (``int4``, ``gptq4-g64``, ...): one cell (no
    sparsity of its own); in a combination with a weights method (``sparsegpt+int4``) the pruning
    config quantizes the kept weights (SparseGPT: jointly in its OBS loop)."""
    from sparseland.registry import make_config

    scheme = make_config(method).scheme

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        from sparseland.api import sparsify_

        config = make_config(method, **cell.options)
        return sparsify_(model, config, calibration=workload.calibration() if config.needs_calibration else None)

    return Runner(apply=apply, version="1", family="quant", nm_patterns=False, quant_scheme=scheme, sparsity_free=True)


def _attention_runner(method: str) -> Runner:
    """A runner for a sparse-attention method of the registry; the sparsity is the fraction of attention
    it is asked to skip (perplexity windows are short: long-context accuracy is ``sparseland longctx``'s
    job)."""

    def apply(model: torch.nn.Module, cell: Cell, workload: Workload) -> Any:
        from sparseland.api import sparsify_
        from sparseland.registry import make_config

        return sparsify_(model, make_config(method, cell.sparsity, **cell.options))

    return Runner(apply=apply, version="1", family="attention", nm_patterns=False)


def _register_from_registry() -> None:
    """Every registry name of the weights, activations and quant families is a frontier method, and the
    prefill attention methods (decode-only methods do not change perplexity over whole windows)."""
    from sparseland import registry

    makers = {"weights": _weights_runner, "activations": _activation_runner, "quant": _quant_runner}
    for family, make in makers.items():
        for name in registry.names(family):
            register_runner(name, make(name))
    for name in ("streaming", "flexprefill", "vertical_slash", "block_sparse", "xattention"):
        register_runner(name, _attention_runner(name))


register_runner("dense", Runner(apply=lambda model, cell, workload: None, family="dense"))
_register_from_registry()
