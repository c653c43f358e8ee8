"""Sparse training and sparse fine-tuning (masks kept through optimizer steps)."""

from sparseland.training.configs import (
    GMPConfig,
    GraNetConfig,
    ProgressiveGradientFlowConfig,
    RigLConfig,
    SETConfig,
    SRSTEConfig,
    StaticConfig,
)
from sparseland.training.distill import DistillLosses, distillation_loss, kd_loss, squarehead_loss
from sparseland.training.distributions import erk_densities, layer_densities, random_masks, uniform_densities
from sparseland.training.finetune import FinetuneConfig, FinetuneResult  # not `finetune`: it would hide the module
from sparseland.training.masking import MaskSet
from sparseland.training.nm import SRSTE, ProgressiveGradientFlow
from sparseland.training.soup import sparse_soup
from sparseland.training.sparsifiers import GMP, SET, GraNet, RigL, StaticSparsifier
from sparseland.training.trainer import SparsityCallback, make_sparsifier

__all__ = [
    "DistillLosses",
    "FinetuneConfig",
    "FinetuneResult",
    "distillation_loss",
    "kd_loss",
    "squarehead_loss",
    "GMP",
    "GMPConfig",
    "GraNet",
    "GraNetConfig",
    "MaskSet",
    "ProgressiveGradientFlow",
    "ProgressiveGradientFlowConfig",
    "RigL",
    "RigLConfig",
    "SET",
    "SETConfig",
    "SRSTE",
    "SRSTEConfig",
    "SparsityCallback",
    "StaticConfig",
    "StaticSparsifier",
    "erk_densities",
    "layer_densities",
    "make_sparsifier",
    "random_masks",
    "sparse_soup",
    "uniform_densities",
]
