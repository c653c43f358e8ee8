"""Activation sparsity: per-tensor/per-channel thresholds (TEAL, CATS, CHESS), weight-informed top-k
(WINA) and sparse-plus-low-rank (R-Sparse), calibrated on a few token windows and applied as hooks.

    from sparseland import sparsify_
    from sparseland.activations import TEALConfig, save_activation_state
    sparsify_(model, TEALConfig(sparsity=0.4), calibration=corpus.calibration(16, 512))
    save_activation_state(model, "teal40.safetensors")  # load_activation_state(model, path) reinstalls

Modules: ``core`` (pure tensor functions), ``calibrate`` (the capture driver), ``methods`` (configs
and their ``@register``-ed appliers), ``allocate`` (TEAL's greedy allocation), ``sites`` (hooks and
state), ``store`` (safetensors + JSON header), ``report`` (weight reads skipped), ``cli``.

Hooks for the runtime: ``activation_thresholds(model)`` maps each Linear name to ``(where, threshold)``
(where is "input" or "gate_act"; threshold () or (C,), keep ``|v| > threshold``); the full rule of a
site (top-k ``keep``/``scale``, R-Sparse ``lr_a``/``lr_b``) is ``get_state(model).by_module()[name]``.
Weights are never modified, so weight checkpoints are unaffected; ``activation_state_dict(model)``
gives ``(tensors, header)`` to store next to them.
"""

from sparseland.activations.calibrate import Samples, collect, linear_roles
from sparseland.activations.methods import (
    ActivationConfig,
    CATSConfig,
    CHESSConfig,
    RSparseConfig,
    TEALConfig,
    WINAConfig,
)
from sparseland.activations.report import weight_reads_skipped
from sparseland.activations.sites import Site, activation_thresholds, get_state, measure_sparsity, remove
from sparseland.activations.store import (
    activation_state_dict,
    load_activation_state,
    load_activation_state_dict,
    save_activation_state,
)

__all__ = [
    "ActivationConfig",
    "CATSConfig",
    "CHESSConfig",
    "RSparseConfig",
    "Samples",
    "Site",
    "TEALConfig",
    "WINAConfig",
    "activation_state_dict",
    "activation_thresholds",
    "collect",
    "get_state",
    "linear_roles",
    "load_activation_state",
    "load_activation_state_dict",
    "measure_sparsity",
    "remove",
    "save_activation_state",
    "weight_reads_skipped",
]
