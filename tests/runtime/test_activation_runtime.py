"""Activation sparsity on the runtime: hooked layers get the actsparse format and the same outputs."""

import pytest
import torch

from sparseland.activations import CATSConfig, RSparseConfig, TEALConfig, WINAConfig, get_state, remove
from sparseland.api import sparsify_
from sparseland.runtime.generate import greedy_generate
from sparseland.runtime.modules import SparseLinear, activation_sparse_layers, to_sparse_runtime_
from tests.conftest import make_tiny_llama

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(3, 256, (1, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(
    "make",
    [lambda: TEALConfig(sparsity=0.5), lambda: CATSConfig(sparsity=0.5), lambda: WINAConfig(sparsity=0.5)],
    ids=["teal", "cats", "wina"],
)
def test_actsparse_runtime_equals_the_hooked_model(make) -> None:
    model = make_tiny_llama()
    sparsify_(model, make(), calibration=CALIB)
    want_logits = model(IDS).logits
    want = greedy_generate(model, IDS, 8, stop_at_eos=False).tokens
    act, _ = activation_sparse_layers(model)
    assert act  # the method sparsified some inputs
    to_sparse_runtime_(model, format="auto")
    mods = dict(model.named_modules())
    for name in act:
        assert isinstance(mods[name], SparseLinear) and mods[name].weight_format.name == "actsparse"
    torch.testing.assert_close(model(IDS).logits, want_logits, atol=1e-4, rtol=1e-4)
    assert greedy_generate(model, IDS, 8, stop_at_eos=False).tokens == want
    remove(model)  # the hooks moved with the layers: remove still finds them
    assert get_state(model) is None and all(not m._forward_pre_hooks for m in model.modules())


def test_hooks_really_act_after_conversion() -> None:
    model = make_tiny_llama()
    dense_logits = model(IDS).logits
    sparsify_(model, TEALConfig(sparsity=0.7), calibration=CALIB)
    to_sparse_runtime_(model, format="auto")
    assert not torch.allclose(model(IDS).logits, dense_logits, atol=1e-3)  # sparsity still applied


def test_rsparse_layers_stay_linear_and_match() -> None:
    model = make_tiny_llama()
    sparsify_(model, RSparseConfig(sparsity=0.5, rank=8), calibration=CALIB)
    want = model(IDS).logits
    act, keep = activation_sparse_layers(model)
    assert keep and not (act & keep)
    to_sparse_runtime_(model)
    mods = dict(model.named_modules())
    assert all(type(mods[n]) is torch.nn.Linear for n in keep)
    torch.testing.assert_close(model(IDS).logits, want, atol=1e-4, rtol=1e-4)


def test_activation_sparse_off_keeps_the_requested_format() -> None:
    model = make_tiny_llama()
    sparsify_(model, TEALConfig(sparsity=0.5), calibration=CALIB)
    to_sparse_runtime_(model, format="dense", activation_sparse=False)
    assert {m.weight_format.name for m in model.modules() if isinstance(m, SparseLinear)} == {"dense"}


def test_converting_a_deep_copy_leaves_the_original_hooked() -> None:
    import copy

    model = make_tiny_llama()
    sparsify_(model, TEALConfig(sparsity=0.5), calibration=CALIB)
    want = model(IDS).logits
    fast = copy.deepcopy(model)
    to_sparse_runtime_(fast)
    torch.testing.assert_close(model(IDS).logits, want)  # the original still has its hooks
    torch.testing.assert_close(fast(IDS).logits, want, atol=1e-4, rtol=1e-4)
    remove(fast)
    torch.testing.assert_close(model(IDS).logits, want)
    assert get_state(model) is not None
