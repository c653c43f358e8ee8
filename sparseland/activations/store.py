"""Save and reload a model's activation sparsity exactly (safetensors + a JSON header, no pickle).

File layout (``save_activation_state``; written to a temporary name and renamed)::

    tensors   "<module>::threshold" () or (C,), "<module>::scale" (C,),
              "<module>::lr_a" (out, r), "<module>::lr_b" (r, in)       -- float32, as calibrated
    metadata  {"sparseland_activations": JSON {"format": "sparseland-activations", "version": 1,
               "config": {...config.to_dict()...},
               "sites": [{"module": name, "where": "input"|"gate_act", "keep": int|null}, ...]}}

``activation_state_dict(model)`` returns the same ``(tensors, header)`` pair so a checkpoint writer
can store it next to the weights (e.g. under a key prefix) and ``load_activation_state_dict`` puts it
back; the hooks are rebuilt from it and reproduce the saved thresholds bit for bit.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from sparseland.activations.sites import ActivationState, Site, get_state, install
from sparseland.errors import SparselandError

FORMAT = "sparseland-activations"
VERSION = 1
META_KEY = "sparseland_activations"


def activation_state_dict(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(tensors, header)`` describing the model's activation sparsity (see the module docstring)."""
    state = get_state(model)
    if state is None:
        raise SparselandError("the model has no activation sparsity to save; apply a config with sparsify_ first")
    tensors: dict[str, torch.Tensor] = {}
    for site in state.sites:
        for field_name, t in site.tensors().items():
            tensors[f"{site.module}::{field_name}"] = t.detach().float().contiguous().clone()
    header = {
        "format": FORMAT,
        "version": VERSION,
        "config": state.config,
        "sites": [{"module": s.module, "where": s.where, "keep": s.keep} for s in state.sites],
    }
    return tensors, header


def load_activation_state_dict(
    model: torch.nn.Module, tensors: dict[str, torch.Tensor], header: dict[str, Any]
) -> ActivationState:
    """Install the activation sparsity described by ``(tensors, header)`` on ``model`` (replacing any)."""
    if header.get("format") != FORMAT:
        raise SparselandError(f"not a sparseland activation state (format {header.get('format')!r})")
    if header.get("version", 0) > VERSION:
        raise SparselandError(f"activation state version {header['version']} is newer than this sparseland; upgrade")
    sites = []
    for entry in header["sites"]:
        name = entry["module"]
        fields = {
            f: tensors[f"{name}::{f}"] for f in ("threshold", "scale", "lr_a", "lr_b") if f"{name}::{f}" in tensors
        }
        sites.append(Site(name, entry["where"], keep=entry.get("keep"), **fields))
    modules = dict(model.named_modules())
    for site in sites:  # shapes must fit this model
        mod = modules.get(site.module)
        if not isinstance(mod, torch.nn.Linear):
            raise SparselandError(
                f"saved site {site.module!r} is not a Linear of this model; load it on the same model"
            )
        width = mod.in_features if site.where == "input" else mod.out_features
        for t in (site.threshold, site.scale):
            if t is not None and t.dim() == 1 and t.numel() != width:
                raise SparselandError(
                    f"saved thresholds for {site.module!r} have {t.numel()} channels, the model {width}"
                )
    return install(model, header["config"], sites)


def save_activation_state(model: torch.nn.Module, path: str | Path) -> Path:
    """Write the model's activation sparsity to ``path`` (safetensors), atomically."""
    from safetensors.torch import save_file

    tensors, header = activation_state_dict(model)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={META_KEY: json.dumps(header, sort_keys=True)})
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_activation_state(model: torch.nn.Module, path: str | Path) -> ActivationState:
    """Read a file written by ``save_activation_state`` and install it on ``model``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise SparselandError(f"activation state file {str(path)!r} does not exist")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if META_KEY not in meta:
            raise SparselandError(f"{path} is a safetensors file but holds no sparseland activation state")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    return load_activation_state_dict(model, tensors, json.loads(meta[META_KEY]))
