"""Each architecture against its defining property, and training on a tiny synthetic cache."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.sae import (
    ActivationCache,
    BatchTopKConfig,
    JumpReLUConfig,
    ReLUConfig,
    TopKConfig,
    build_sae,
    load_sae,
    save_sae,
    train_sae,
)
from sparseland.sae.evaluate import reconstruction_metrics
from sparseland.sae.jumprelu import JumpReLUFn, StepFn
from sparseland.sae.mpsae import MPConfig
from sparseland.sae.topk import auxk_loss

pytestmark = pytest.mark.usefixtures("one_thread")


def test_topk_keeps_exactly_the_k_largest():
    torch.manual_seed(0)
    sae = build_sae(TopKConfig(width=64, k=5), 16)
    x = torch.randn(10, 16)
    z = sae.encode(x)
    pre = sae.pre_acts(x / sae.scale_in)
    assert ((z != 0).sum(1) <= 5).all()
    top = pre.topk(5, dim=1)
    assert torch.allclose(z.gather(1, top.indices), top.values.clamp_min(0))


def test_topk_sparse_backward_equals_dense():
    torch.manual_seed(0)
    x = torch.randn(32, 16)
    grads = []
    for sparse in (True, False):
        sae = build_sae(TopKConfig(width=64, k=4, sparse=sparse, aux_coeff=0), 16)
        loss, _ = sae.loss_n(x, x, torch.zeros(64, dtype=torch.bool))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_auxk_uses_only_dead_latents():
    torch.manual_seed(0)
    sae = build_sae(TopKConfig(width=32, k=4), 8)
    x = torch.randn(16, 8)
    resid = torch.randn(16, 8)
    assert auxk_loss(sae, x, resid, torch.zeros(32, dtype=torch.bool), 8) == 0
    dead = torch.zeros(32, dtype=torch.bool)
    dead[:6] = True
    loss = auxk_loss(sae, x, resid, dead, 8)
    loss.backward()
    assert loss > 0
    assert sae.W_dec.grad[6:].abs().max() == 0 and sae.W_dec.grad[:6].abs().max() > 0


def test_batchtopk_keeps_k_times_batch_and_learns_a_threshold():
    torch.manual_seed(0)
    sae = build_sae(BatchTopKConfig(width=64, k=4, aux_coeff=0), 16)
    x = torch.randn(20, 16)
    sae.train()
    loss, info = sae.loss_n(x, x, torch.zeros(64, dtype=torch.bool))
    z = sae.encode_n(x)
    assert int((z > 0).sum()) == 4 * 20
    assert (z > 0).sum(1).float().std() > 0  # a variable number per token
    assert sae.threshold > 0 and float(sae.threshold) == pytest.approx(float(z[z > 0].min()))
    sae.eval()
    z_inf = sae.encode_n(x)
    pre = sae.pre_acts(x)
    assert torch.equal(z_inf > 0, pre > sae.threshold)  # inference: the threshold, not the batch


def test_jumprelu_straight_through_gradients():
    pre = torch.tensor([[0.10, 0.50, 0.2995]], requires_grad=True)
    theta = torch.tensor([0.3, 0.3, 0.3], requires_grad=True)
    eps = 0.002
    z = JumpReLUFn.apply(pre, theta, eps)
    assert z.tolist() == [[0.0, 0.5, 0.0]]
    z.sum().backward()
    assert pre.grad.tolist() == [[0.0, 1.0, 0.0]]
    # only the third entry lies within eps/2 of theta: d/dtheta = -(theta / eps)
    assert theta.grad.tolist() == pytest.approx([0.0, 0.0, -0.3 / eps])
    theta.grad = None
    StepFn.apply(pre, theta, eps).sum().backward()
    assert theta.grad.tolist() == pytest.approx([0.0, 0.0, -1 / eps])


def test_relu_l1_penalty():
    torch.manual_seed(0)
    sae = build_sae(ReLUConfig(width=32, l1_coeff=0.5), 8)
    x = torch.randn(4, 8)
    loss, info = sae.loss_n(x, x, torch.zeros(32, dtype=torch.bool))
    z = sae.encode_n(x)
    mse = (x - sae.decode_n(z)).pow(2).sum(-1).mean()
    assert float(loss) == pytest.approx(float(mse + 0.5 * z.sum(-1).mean()), rel=1e-5)


def test_decoder_rows_stay_unit_norm_after_a_step():
    torch.manual_seed(0)
    sae = build_sae(TopKConfig(width=32, k=4), 8)
    opt = torch.optim.Adam(sae.parameters(), lr=0.1)
    x = torch.randn(16, 8)
    loss, _ = sae.loss_n(x, x, torch.zeros(32, dtype=torch.bool))
    loss.backward()
    g = sae.W_dec.grad.clone()
    sae.before_step()
    assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-5  # no component along the rows
    assert not torch.equal(g, sae.W_dec.grad)
    opt.step()
    sae.after_step()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-5)


def test_config_errors():
    with pytest.raises(SparselandError, match="k=0"):
        TopKConfig(width=8, k=0)
    with pytest.raises(SparselandError, match="width"):
        BatchTopKConfig(width=0)


def _synthetic_cache(path, d=16, n_atoms=48, n=6144, seed=0):
    """A cache of k-sparse combinations of random unit atoms, plus a 'mlp_out' that is a fixed linear map."""
    gen = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=gen)
    atoms /= atoms.norm(dim=1, keepdim=True)
    lin = torch.randn(d, d, generator=gen) / d**0.5
    splits = {}
    for split, rows in (("train", n), ("eval", 1024)):
        codes = torch.zeros(rows, n_atoms)
        idx = torch.randint(0, n_atoms, (rows, 3), generator=gen)
        codes.scatter_(1, idx, torch.rand(rows, 3, generator=gen) * 3 + 1)
        x = codes @ atoms + 0.5
        (path / split).mkdir(parents=True)
        np.save(path / split / "shard-00000.resid.npy", x.half().numpy())
        np.save(path / split / "shard-00000.mlp_in.npy", x.half().numpy())
        np.save(path / split / "shard-00000.mlp_out.npy", (x @ lin).half().numpy())
        splits[split] = {
            "target_tokens": rows,
            "shards": [{"stem": "shard-00000", "rows": rows}],
            "tokens": rows,
            "complete": True,
        }
    manifest = {
        "version": 1,
        "model": "synthetic",
        "layer": 0,
        "sites": ["resid", "mlp_in", "mlp_out"],
        "d_model": d,
        "seq_len": 0,
        "text": "synthetic",
        "dtype": "float16",
        "excluded": "",
        "splits": splits,
    }
    (path / "manifest.json").write_text(json.dumps(manifest))
    return ActivationCache(path)


@pytest.mark.parametrize(
    "config",
    [
        TopKConfig(width=64, k=3),
        BatchTopKConfig(width=64, k=3),
        ReLUConfig(width=64, l1_coeff=0.3),
        JumpReLUConfig(width=64, l0_coeff=0.05, bandwidth=0.05, init_threshold=0.1),
        TopKConfig(width=64, k=3, transcoder=True),
        MPConfig(width=64, k=3),
    ],
    ids=lambda c: c.arch + ("-transcoder" if c.transcoder else ""),
)
def test_training_learns_a_sparse_dictionary(tmp_path, config):
    cache = _synthetic_cache(tmp_path / "c")
    untrained = build_sae(config, 16, 16)
    in_site, out_site = ("mlp_in", "mlp_out") if config.transcoder else ("resid", "resid")
    untrained.set_scales(
        *(torch.from_numpy(np.array(cache.split("train").shard(0, s))).float() for s in (in_site, out_site))
    )
    fvu0 = reconstruction_metrics(untrained, cache.split("eval"), in_site, out_site)["fvu"]
    sae, res = train_sae(cache, config, tokens=6144 * 6, batch_size=256, lr=3e-3, progress=False)
    m = reconstruction_metrics(sae, cache.split("eval"), in_site, out_site)
    assert m["fvu"] < 0.35 and m["fvu"] < fvu0 / 3, (m, fvu0)
    assert m["l0"] < 20
    save_sae(sae, tmp_path / "s", {"layer": 0})
    sae2, meta = load_sae(tmp_path / "s")
    x = torch.randn(5, 16)
    assert torch.allclose(sae(x), sae2(x)) and meta["layer"] == 0


def test_matching_pursuit_residual_orthogonal_and_shrinking():
    from sparseland.sae.mpsae import MPConfig, matching_pursuit

    torch.manual_seed(0)
    atoms = torch.randn(40, 8)
    atoms /= atoms.norm(dim=1, keepdim=True)
    x = torch.randn(6, 8)
    prev = x.norm(dim=1)
    for k in range(1, 6):
        z, r = matching_pursuit(x, atoms, k)
        assert torch.allclose(z @ atoms + r, x, atol=1e-5)  # codes and residual account for x exactly
        assert (r.norm(dim=1) <= prev + 1e-6).all()
        prev = r.norm(dim=1)
    # one step: the residual is orthogonal to the atom chosen
    z1, r1 = matching_pursuit(x, atoms, 1)
    j = z1.argmax(1)
    assert (r1 * atoms[j]).sum(1).abs().max() < 1e-5
    sae = build_sae(MPConfig(width=40, k=3), 8)
    assert ((sae.encode(x) != 0).sum(1) <= 3).all()


def test_itda_atoms_are_normalized_activations_and_cover_the_data(tmp_path):
    from sparseland.sae.itda import ITDAConfig

    cache = _synthetic_cache(tmp_path / "c")
    sae, _ = train_sae(
        cache, ITDAConfig(width=256, k=3, error_threshold=0.2), tokens=4096, batch_size=256, progress=False
    )
    n = int(sae.n_atoms)
    assert 0 < n <= 256
    atoms = sae.W_dec[:n]
    assert torch.allclose(atoms.norm(dim=1), torch.ones(n), atol=1e-5)
    train = torch.from_numpy(np.array(cache.split("train").shard(0, "resid"))).float() / sae.scale_in
    train = train / train.norm(dim=1, keepdim=True)
    # every atom is one of the (normalized) training activations
    assert ((atoms @ train.T).max(dim=1).values > 1 - 1e-3).all()
    m = reconstruction_metrics(sae, cache.split("eval"), "resid", "resid")
    assert m["fvu"] < 0.5 and m["l0"] <= 3
