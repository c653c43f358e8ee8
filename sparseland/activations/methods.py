"""The activation-sparsity methods: one config each, calibrated on the dense model, applied as hooks.

    sparsify_(model, TEALConfig(sparsity=0.5), calibration=corpus.calibration(16, 512))

Every config names its ``targets``: the roles of the Llama projections whose *input* is made sparse
(``q k v o gate up down``), or ``gate_act`` for the MLP gate activation ``act(gate(x))`` (the down
projection's input; its zeros also let up/gate skip rows). Thresholds are uniform across layers:
each tensor is calibrated to hit ``sparsity`` on its own (TEAL's uniform setting). Applying a config
replaces any activation sparsity the model already has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sparseland.activations import core
from sparseland.activations.calibrate import ROLES, Samples, collect, linear_roles
from sparseland.activations.sites import ActivationState, Site, install, remove
from sparseland.api import FilterFn, register
from sparseland.config import SparsityConfig, check_fraction
from sparseland.errors import SparselandError


@dataclass
class ActivationConfig(SparsityConfig):
    """Shared fields. ``sparsity``: fraction of entries zeroed in each targeted tensor, in [0, 1)."""

    sparsity: float = 0.5
    targets: tuple[str, ...] = ROLES
    calib_tokens: int = 2048  # token rows sampled per tensor for the quantiles
    allowed: ClassVar[tuple[str, ...]] = ROLES

    def validate(self) -> None:
        check_fraction("sparsity", self.sparsity)
        if isinstance(self.targets, str) or not self.targets:
            raise SparselandError(f"targets={self.targets!r} must be a non-empty list such as {list(self.allowed)}")
        self.targets = tuple(self.targets)
        bad = [t for t in self.targets if t not in self.allowed]
        if bad:
            raise SparselandError(
                f"unknown target modules {bad} for {type(self).__name__}; choose from {list(self.allowed)}"
            )
        if not isinstance(self.calib_tokens, int) or self.calib_tokens <= 0:
            raise SparselandError(f"calib_tokens={self.calib_tokens!r} must be a positive integer, e.g. 2048")


@dataclass
class TEALConfig(ActivationConfig):
    """TEAL (Liu et al. 2024, "Training-Free Activation Sparsity in Large Language Models").

    Zero hidden-state entries with ``|x|`` below a per-tensor threshold, the ``sparsity``-quantile of
    ``|x|`` on calibration data, at the inputs of q/k/v (one shared tensor), o, gate/up (shared), down.
    ``allocation`` (role -> sparsity) overrides the uniform level; ``greedy=True`` computes one whose
    parameter-weighted mean is ``sparsity`` with the least calibration loss (see ``allocate``).
    """

    kind: ClassVar[str] = "teal"
    allocation: dict[str, float] | None = None
    greedy: bool = False

    def validate(self) -> None:
        super().validate()
        for role, value in (self.allocation or {}).items():
            if role not in ROLES:
                raise SparselandError(f"allocation key {role!r} is not a projection role; use {list(ROLES)}")
            check_fraction(f"allocation[{role!r}]", value)


@dataclass
class CATSConfig(ActivationConfig):
    """CATS (Lee et al. 2024, "Contextually-Aware Thresholding for Sparsity in LLMs").

    Zero the MLP gate activation ``SiLU(gate(x))`` where its magnitude is below one per-layer threshold
    (the ``sparsity``-quantile of ``|SiLU(gate(x))|``); attention stays dense.
    """

    kind: ClassVar[str] = "cats"
    targets: tuple[str, ...] = ("gate_act",)
    allowed: ClassVar[tuple[str, ...]] = ("gate_act",)


@dataclass
class CHESSConfig(ActivationConfig):
    """CHESS (He et al. 2024, "Channel-Wise Thresholding and Selective Sparsification").

    MLP: channel-wise thresholds on ``a = SiLU(gate(x))``: drop ``a_i`` when ``|a_i| * E|up_i(x)|`` is
    below the ``sparsity``-quantile of that importance, i.e. ``t_i = tau / E|up_i|``. Attention:
    per-tensor thresholds on the inputs of the q and o projections only (selective sparsification).
    """

    kind: ClassVar[str] = "chess"
    targets: tuple[str, ...] = ("q", "o", "gate_act")
    allowed: ClassVar[tuple[str, ...]] = ("q", "k", "v", "o", "gate_act")


@dataclass
class WINAConfig(ActivationConfig):
    """WINA (Chen et al. 2025, "Weight Informed Neuron Activation").

    Keep the inputs with the largest ``|x_i| * ||W[:, i]||_2`` for each Linear: per token top-k
    (``mode="topk"``) or a calibrated threshold on that score (``mode="threshold"``, the reference
    code's default, which a thresholding kernel can run). Without the paper's orthogonalizing
    transform of the weights.
    """

    kind: ClassVar[str] = "wina"
    mode: str = "threshold"

    def validate(self) -> None:
        super().validate()
        if self.mode not in ("threshold", "topk"):
            raise SparselandError(f"mode={self.mode!r} must be 'threshold' or 'topk'")


@dataclass
class RSparseConfig(ActivationConfig):
    """R-Sparse (Zhang et al. 2025, "Rank-Aware Activation Sparsity for Efficient LLM Inference").

    ``y = W (x*m) + U_r S_r V_r^T (x*(1-m))``: input channels above a TEAL threshold use the full
    weight, the dropped ones a rank-``rank`` SVD of it. With ``match_compute`` the channel sparsity is
    raised so that the low-rank work is paid for: ``s + rank*(in+out)/(in*out)``.
    """

    kind: ClassVar[str] = "rsparse"
    rank: int = 16
    match_compute: bool = False

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.rank, int) or self.rank < 0:
            raise SparselandError(f"rank={self.rank!r} must be a non-negative integer (0 = no low-rank part)")


def _roles(model: torch.nn.Module, config: ActivationConfig, filter_fn: FilterFn | None) -> dict[str, str]:
    remove(model)  # a new config replaces the old one, and calibration must see the dense model
    want = set(config.targets) | ({"gate"} if "gate_act" in config.targets else set())
    return {n: r for n, r in linear_roles(model, filter_fn).items() if r in want}


def _inputs(roles: dict[str, str], config: ActivationConfig) -> dict[str, str]:
    return {n: r for n, r in roles.items() if r in config.targets}


def _check_windows(calibration: torch.Tensor | None) -> torch.Tensor:
    if calibration is None or calibration.dim() != 2:
        raise SparselandError("greedy allocation needs calibration windows: pass calibration=(N, T) token ids")
    return calibration


def _up_of(gate: str) -> str:
    return gate.removesuffix("gate_proj") + "up_proj"


def _samples(model, config, calibration, roles, samples: Samples | None, gates=False, ups=False) -> Samples:
    if samples is not None:
        return samples
    gate_names = [n for n, r in roles.items() if r == "gate"] if gates else []
    return collect(
        model,
        calibration,
        inputs=_inputs(roles, config),
        gates=gate_names,
        ups=[_up_of(g) for g in gate_names] if ups else [],
        max_tokens=config.calib_tokens,
    )


def _teal_sites(roles: dict[str, str], samples: Samples, sparsity: float) -> list[Site]:
    return [
        Site(n, "input", threshold=core.quantile_threshold(samples.input_of(n, r), sparsity)) for n, r in roles.items()
    ]


@register(TEALConfig)
def apply_teal(model, config: TEALConfig, calibration=None, filter_fn=None, samples=None) -> ActivationState:
    from sparseland.activations.experts import expert_roles, fill_missing

    roles = _inputs(_roles(model, config, filter_fn), config)
    roles |= _inputs(expert_roles(model, filter_fn), config)  # per MoE expert: its routed tokens
    samples = _samples(model, config, calibration, roles, samples)
    fell = fill_missing(samples.inputs, list(roles))
    allocation = config.allocation
    if config.greedy and allocation is None:
        from sparseland.activations import allocate

        windows = _check_windows(calibration)[:4]  # Step 1 on a few windows: 4 groups x 5 levels passes
        curves = allocate.group_loss_curves(model, windows, samples)
        allocation = allocate.allocate(curves, allocate.group_params(model), config.sparsity)
    levels = {r: (allocation or {}).get(r, config.sparsity) for r in ROLES}
    sites = [
        Site(n, "input", threshold=core.quantile_threshold(samples.input_of(n, r), levels[r])) for n, r in roles.items()
    ]
    resolved = config.to_dict()
    if allocation is not None:  # record the levels used, so the saved config reproduces them
        resolved.update(allocation={r: levels[r] for r in sorted(set(roles.values()))}, greedy=False)
    state = install(model, resolved, sites)
    state.expert_fallback = fell  # experts without calibration tokens: their block's pooled samples
    return state


@register(CATSConfig)
def apply_cats(model, config: CATSConfig, calibration=None, filter_fn=None, samples=None) -> ActivationState:
    gates = [n for n, r in _roles(model, config, filter_fn).items() if r == "gate"]
    samples = _samples(model, config, calibration, dict.fromkeys(gates, "gate"), samples, gates=True)
    sites = [
        Site(g, "gate_act", threshold=core.quantile_threshold(samples.gate_acts[g], config.sparsity)) for g in gates
    ]
    return install(model, config.to_dict(), sites)


@register(CHESSConfig)
def apply_chess(model, config: CHESSConfig, calibration=None, filter_fn=None, samples=None) -> ActivationState:
    roles = _roles(model, config, filter_fn)
    use_gate = "gate_act" in config.targets
    samples = _samples(model, config, calibration, roles, samples, gates=use_gate, ups=use_gate)
    sites = _teal_sites(_inputs(roles, config), samples, config.sparsity)  # attention: per tensor
    for g in (n for n, r in roles.items() if r == "gate" and use_gate):  # MLP: per channel
        t = core.scaled_thresholds(samples.gate_acts[g], samples.up_means[_up_of(g)], config.sparsity)
        sites.append(Site(g, "gate_act", threshold=t))
    return install(model, config.to_dict(), sites)


@register(WINAConfig)
def apply_wina(model, config: WINAConfig, calibration=None, filter_fn=None, samples=None) -> ActivationState:
    roles = _inputs(_roles(model, config, filter_fn), config)
    modules = dict(model.named_modules())
    if config.mode == "threshold":
        samples = _samples(model, config, calibration, roles, samples)
    sites = []
    for n, r in roles.items():
        norms = core.column_norms(modules[n].weight)  # (in,)
        if config.mode == "topk":
            sites.append(Site(n, "input", scale=norms, keep=core.keep_count(norms.numel(), config.sparsity)))
        else:
            t = core.scaled_thresholds(samples.input_of(n, r), norms, config.sparsity)
            sites.append(Site(n, "input", threshold=t))
    return install(model, config.to_dict(), sites)


def rsparse_channel_sparsity(config: RSparseConfig, out_f: int, in_f: int) -> float:
    """The input-channel sparsity R-Sparse uses for an (out, in) Linear."""
    if not config.match_compute or config.sparsity == 0:
        return config.sparsity
    s = config.sparsity + config.rank * (out_f + in_f) / (out_f * in_f)
    if s >= 1:
        raise SparselandError(
            f"rank={config.rank} costs more than sparsity={config.sparsity} saves on a "
            f"{out_f}x{in_f} Linear; "
            "lower the rank or the sparsity, or set match_compute=False"
        )
    return s


@register(RSparseConfig)
def apply_rsparse(model, config: RSparseConfig, calibration=None, filter_fn=None, samples=None) -> ActivationState:
    roles = _inputs(_roles(model, config, filter_fn), config)
    samples = _samples(model, config, calibration, roles, samples)
    modules = dict(model.named_modules())
    sites = []
    for n, r in roles.items():
        w = modules[n].weight  # (out, in)
        s = rsparse_channel_sparsity(config, *w.shape)
        site = Site(n, "input", threshold=core.quantile_threshold(samples.input_of(n, r), s))
        if config.rank > 0 and config.sparsity > 0:
            site.lr_a, site.lr_b = core.lowrank_factors(w, config.rank)
        sites.append(site)
    return install(model, config.to_dict(), sites)
