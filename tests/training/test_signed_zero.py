"""Pruned entries are written as +0.0 everywhere masks are applied: a product ``w * mask`` leaves -0.0
where a weight was negative, and a checkpoint's sparse formats count -0.0 as a stored nonzero."""

from __future__ import annotations

import copy

import torch

from sparseland.training import sparse_soup
from sparseland.training.masking import MaskSet
from tests.conftest import make_tiny_llama


def _negative_zeros(model: torch.nn.Module) -> int:
    return sum(int(((p == 0) & torch.signbit(p)).sum()) for p in model.parameters())


def _half_mask(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.rand(p.shape, generator=g) < 0.5 for n, p in model.named_parameters() if n.endswith("proj.weight")}


def test_maskset_apply_writes_positive_zeros():
    model = make_tiny_llama()
    masks = MaskSet(model, _half_mask(model))
    masks.apply_()
    assert _negative_zeros(model) == 0
    for name, p in masks.params.items():
        assert not p.detach()[~masks.masks[name]].any()


def test_masked_gradients_and_soup_write_positive_zeros():
    model = make_tiny_llama()
    masks = MaskSet(model, _half_mask(model))
    masks.apply_()
    masks.hook_grads()
    model(torch.randint(0, 256, (1, 16))).logits.sum().backward()
    for name, p in masks.params.items():
        g = p.grad[~masks.masks[name]]
        assert not g.any() and not torch.signbit(g).any()
    other = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name in masks.masks:
                p.neg_()  # averages of w and -w cancel to zero; the re-mask must still write +0.0
    soup = sparse_soup([model, other])
    assert _negative_zeros(soup) == 0
