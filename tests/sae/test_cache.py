"""The activation cache: what it stores, what it leaves out, atomic resumable shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.sae.cache import ActivationCache, harvest

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tok:
    all_special_ids = [1, 2]


def token_fn(split, max_tokens):
    gen = torch.Generator().manual_seed(0 if split == "train" else 1)
    ids = torch.randint(3, 256, (max_tokens,), generator=gen)
    ids[17] = 2  # one special token inside a window
    return ids


def _harvest(model, out, **kw):
    args = dict(
        model_name="tiny",
        layer=1,
        sites=("resid", "mlp_in", "mlp_out"),
        tokens=300,
        eval_tokens=60,
        seq_len=16,
        batch_size=2,
        shard_windows=4,
        progress=False,
        token_fn=token_fn,
    )
    args.update(kw)
    return harvest(model, _Tok(), out, **args)


def test_cache_holds_the_sites_without_position_zero(tmp_path):
    from tests.conftest import make_tiny_llama

    tiny_llama = make_tiny_llama(layers=3)  # hidden_states of the last block are after the final norm
    stats = _harvest(tiny_llama, tmp_path / "c")
    cache = ActivationCache(tmp_path / "c")
    train = cache.split("train")
    windows = torch.from_numpy(np.array(train.windows())).long()
    assert windows.shape == (20, 16)  # ceil(300 / 15) windows
    assert train.n_tokens == 20 * 15 - 1 == stats["train"].tokens  # position 0 and the special token left out
    with torch.no_grad():
        out = tiny_llama(input_ids=windows, output_hidden_states=True)
    resid_ref = out.hidden_states[2]  # after block 1
    rows = np.concatenate([np.asarray(train.shard(i, "resid")) for i in range(len(train.shards))])
    index = np.concatenate([np.asarray(train.index(i)) for i in range(len(train.shards))])
    assert rows.dtype == np.float16 and (index[:, 1] > 0).all()
    assert not ((windows[index[:, 0], index[:, 1]] == 2).any())
    ref = resid_ref[index[:, 0], index[:, 1]]
    assert torch.allclose(torch.from_numpy(rows).float(), ref, atol=2e-3, rtol=2e-3)
    # mlp_out really is the MLP applied to mlp_in
    mlp = tiny_llama.model.layers[1].mlp
    x_in = torch.from_numpy(np.array(train.shard(0, "mlp_in"))).float()
    y = torch.from_numpy(np.array(train.shard(0, "mlp_out"))).float()
    with torch.no_grad():
        assert torch.allclose(mlp(x_in), y, atol=5e-3, rtol=5e-3)
    assert cache.split("eval").n_tokens == 4 * 15 - 1  # ceil(60 / 15) windows, one special token
    batches = list(train.iter_shuffled(("resid",), 64, seed=0))
    assert len(batches) == train.n_tokens // 64 and batches[0][0].dtype == torch.float32


def test_resume_after_kill_gives_the_same_cache(tiny_llama, tmp_path):
    _harvest(tiny_llama, tmp_path / "full")
    _harvest(tiny_llama, tmp_path / "killed", kill_after_shards=2)
    manifest = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 2 and not manifest["splits"]["train"]["complete"]
    assert not list((tmp_path / "killed").rglob("*.tmp-*"))
    stats = _harvest(tiny_llama, tmp_path / "killed")
    assert stats["train"].resumed_shards == 2
    a, b = ActivationCache(tmp_path / "full").split("train"), ActivationCache(tmp_path / "killed").split("train")
    assert a.rows == b.rows
    for i in range(len(a.shards)):
        assert np.array_equal(np.asarray(a.shard(i, "resid")), np.asarray(b.shard(i, "resid")))


def test_resume_with_other_settings_is_refused(tiny_llama, tmp_path):
    _harvest(tiny_llama, tmp_path / "c", kill_after_shards=1)
    with pytest.raises(SparselandError, match="other settings"):
        _harvest(tiny_llama, tmp_path / "c", layer=0)


def test_bad_cache_and_site_errors(tiny_llama, tmp_path):
    with pytest.raises(SparselandError, match="not an activation cache"):
        ActivationCache(tmp_path)
    with pytest.raises(SparselandError, match="layer 9"):
        _harvest(tiny_llama, tmp_path / "c", layer=9)
