"""Sparse autoencoders and transcoders on a model's activations: an activation cache, one small
module per architecture, metrics defined exactly, training, evaluation, a sweep and a report."""

from sparseland.sae import batchtopk, itda, jumprelu, mpsae, relu, topk  # noqa: F401  (registers the architectures)
from sparseland.sae.base import ARCHS, SAE, SAEConfig, build_sae
from sparseland.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from sparseland.sae.cache import ActivationCache, harvest
from sparseland.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from sparseland.sae.relu import ReLUConfig, ReLUSAE
from sparseland.sae.topk import TopKConfig, TopKSAE
from sparseland.sae.train import load_sae, save_sae, train_sae

__all__ = [
    "ARCHS",
    "SAE",
    "SAEConfig",
    "build_sae",
    "BatchTopKConfig",
    "BatchTopKSAE",
    "ActivationCache",
    "harvest",
    "JumpReLUConfig",
    "JumpReLUSAE",
    "ReLUConfig",
    "ReLUSAE",
    "TopKConfig",
    "TopKSAE",
    "load_sae",
    "save_sae",
    "train_sae",
]
