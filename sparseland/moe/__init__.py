"""MoE-fication: turn a dense model's gated MLPs into experts with a router, in place.

    from sparseland import sparsify_
    from sparseland.moe import MoEfyConfig
    report = sparsify_(model, MoEfyConfig(experts=16, active=0.5, construction="cmoe"), calibration=calib)

Modules: ``config`` (``MoEfyConfig``), ``construct`` (pure: activation rates, balanced k-means, the
expert permutation), ``router`` (pure: router fitting, thresholds), ``module`` (``MoEMLP``, the
block's new ``mlp``, and ``MoERouter``), ``apply`` (the driver registered with ``sparsify_``),
``recover`` (router-frozen distillation from the dense model), ``checkpoint`` (the MoE layout in sparse
checkpoints), ``cli`` (``sparseland moefy``). The decode kernel is ``sparseland.runtime.moe``.
"""

from sparseland.moe.apply import MoEfyReport, moefy_model
from sparseland.moe.config import MoEfyConfig
from sparseland.moe.construct import Experts, activation_rates, balanced_assign, balanced_kmeans, build_experts
from sparseland.moe.module import MoEMLP, MoERouter, moe_layers

__all__ = [
    "Experts",
    "MoEMLP",
    "MoERouter",
    "MoEfyConfig",
    "MoEfyReport",
    "activation_rates",
    "balanced_assign",
    "balanced_kmeans",
    "build_experts",
    "moe_layers",
    "moefy_model",
]
