import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.training import StaticSparsifier, sparse_soup
from tests.training._helpers import make_optimizer, tiny, train


def _trained(seed_data: int, mask_seed: int = 0):
    model = tiny()
    opt = make_optimizer(model, "adamw")
    sp = StaticSparsifier(model, opt, sparsity=0.7, seed=mask_seed)
    train(model, opt, sp, 5, seed=seed_data)
    sp.remove()
    return model, sp


def test_soup_of_a_model_with_itself_is_itself():
    model, _ = _trained(0)
    soup = sparse_soup([model, model])
    for (n, p), (_, q) in zip(model.named_parameters(), soup.named_parameters(), strict=True):
        assert torch.equal(p, q), n
    assert soup is not model


def test_soup_averages_models_sharing_a_mask_and_keeps_it():
    (a, sp), (b, _) = _trained(0), _trained(1)
    soup = sparse_soup([a, b], weights=[0.25, 0.75])
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    for n, p in soup.named_parameters():
        assert torch.allclose(p, 0.25 * pa[n] + 0.75 * pb[n])
        if n in sp.masks.masks:
            assert not p[~sp.masks.masks[n]].any()


def test_soup_refuses_different_masks_naming_the_parameter():
    (a, _), (b, _) = _trained(0, mask_seed=0), _trained(0, mask_seed=1)
    with pytest.raises(SparselandError, match=r"different mask .* 'model\.layers\.0\.self_attn\.q_proj\.weight'"):
        sparse_soup([a, b])
    with pytest.raises(SparselandError, match="sum to 1"):
        sparse_soup([a, a], weights=[0.5, 0.6])
    with pytest.raises(SparselandError, match="at least one"):
        sparse_soup([])
