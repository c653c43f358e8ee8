import math

import pytest
import torch

from sparseland.errors import SparselandError
from sparseland.training import GMP, SET, GMPConfig, GraNet, RigL, StaticSparsifier
from sparseland.training.distributions import n_kept
from sparseland.training.sparsifiers import cosine_drop_fraction, gmp_sparsity
from tests.training._helpers import make_optimizer, tiny, train

SPARSIFIERS = {
    "static-random-erk": lambda m, o: StaticSparsifier(m, o, sparsity=0.8, distribution="erk"),
    "static-magnitude": lambda m, o: StaticSparsifier(m, o, sparsity=0.8, distribution="uniform", init="magnitude"),
    "gmp": lambda m, o: GMP(m, o, sparsity=0.8, start_step=0, prune_every=4, n_prunes=5),
    "set": lambda m, o: SET(m, o, sparsity=0.8, update_every=3, drop_fraction=0.5, total_steps=30),
    "rigl": lambda m, o: RigL(m, o, sparsity=0.8, update_every=3, drop_fraction=0.5, total_steps=30),
    "granet": lambda m, o: GraNet(m, o, sparsity=0.8, prune_every=3, n_prunes=5, drop_fraction=0.5, total_steps=30),
}


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
@pytest.mark.parametrize("method", sorted(SPARSIFIERS))
def test_masks_hold_through_many_steps(method, opt_name):
    model = tiny()
    opt = make_optimizer(model, opt_name)
    sp = SPARSIFIERS[method](model, opt)
    start = {n: m.clone() for n, m in sp.masks.masks.items()}
    densities = []

    def check(t):
        sp.check()  # every masked-out weight is exactly zero
        densities.append(sp.density())

    train(model, opt, sp, 30, after_step=check)
    assert sp.density() == pytest.approx(0.2, abs=0.01)
    for name, p in sp.params.items():
        assert not p.detach()[~sp.masks.masks[name]].any()
        if method.startswith("static"):  # the mask never moves, and every kept weight is live
            assert torch.equal(sp.masks.masks[name], start[name])
            assert torch.equal(p.detach() != 0, start[name])
    if method in ("set", "rigl"):  # the count is constant; the pattern moved
        assert densities == [densities[0]] * len(densities)
        assert any(not torch.equal(start[n], sp.masks.masks[n]) for n in start)
    # Pruned weights carry no optimizer state either, so nothing can leak back in.
    for name, p in sp.params.items():
        for buf in opt.state[p].values():
            if torch.is_tensor(buf) and buf.shape == p.shape:
                assert not buf[~sp.masks.masks[name]].any()


@pytest.mark.parametrize("cls", [RigL, SET])
@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_regrow_equals_drop_zero_init_and_reset_state(cls, opt_name):
    model = tiny()
    opt = make_optimizer(model, opt_name)
    sp = cls(model, opt, sparsity=0.9, update_every=4, drop_fraction=0.4, total_steps=40)
    scores: dict[str, torch.Tensor] = {}
    grow_scores = sp.grow_scores

    def spy(name):
        scores[name] = grow_scores(name)
        return scores[name]

    sp.grow_scores = spy
    before = {n: m.clone() for n, m in sp.masks.masks.items()}
    n_updates = 0

    def check(t):
        nonlocal n_updates
        if sp.is_update_step(t):
            n_updates += 1
            frac = cosine_drop_fraction(t, 0.4, sp.t_end)
            for name, new in sp.masks.masks.items():
                old = before[name]
                dropped, grown = sp.last_update[name]
                assert dropped == grown == int(frac * int(old.sum()))
                assert int(new.sum()) == int(old.sum())
                fresh = new & ~old  # regrown positions: zero weight, zero optimizer state
                assert int(fresh.sum()) == int((old & ~new).sum()) <= grown
                p = sp.params[name]
                assert not p.detach()[fresh].any()
                for buf in opt.state[p].values():
                    if torch.is_tensor(buf) and buf.shape == p.shape:
                        assert not buf[fresh].any()
                if cls is RigL:  # regrown = largest dense |grad| among the entries not kept after the drop
                    s = scores[name]
                    cand = ~new | fresh
                    assert s[fresh].min() >= s[cand & ~fresh].max() if fresh.any() else True
                    assert s[~old].abs().sum() > 0  # the gradient was dense, not masked
        before.update({n: m.clone() for n, m in sp.masks.masks.items()})

    train(model, opt, sp, 40, after_step=check)
    assert n_updates == len([t for t in range(1, 41) if t % 4 == 0 and t < 30])


def test_gmp_follows_the_cubic_schedule():
    cfg = GMPConfig(sparsity=0.8, initial_sparsity=0.1, start_step=2, prune_every=3, n_prunes=4)
    assert gmp_sparsity(1, cfg) == 0.0
    assert gmp_sparsity(2, cfg) == pytest.approx(0.1)
    assert gmp_sparsity(8, cfg) == pytest.approx(0.8 + (0.1 - 0.8) * 0.5**3)
    assert gmp_sparsity(14, cfg) == gmp_sparsity(100, cfg) == pytest.approx(0.8)
    model = tiny()
    opt = make_optimizer(model, "adamw")
    sp = GMP(model, opt, cfg)
    seen = []

    def check(t):
        kept = {n: int(m.sum()) for n, m in sp.masks.masks.items()}
        if sp.is_update_step(t):
            seen.append(t)
            for n, p in sp.params.items():
                assert kept[n] == n_kept(p.numel(), 1 - gmp_sparsity(t, cfg))
        elif t < 2:
            assert all(kept[n] == p.numel() for n, p in sp.params.items())

    train(model, opt, sp, 18, after_step=check)
    assert seen == [2, 5, 8, 11, 14]
    assert sp.density() == pytest.approx(0.2, abs=0.005)


def test_cosine_drop_fraction():
    assert cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_drop_fraction(100, 0.3, 100) == pytest.approx(0.0, abs=1e-12)
    assert cosine_drop_fraction(25, 0.3, 100) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))


@pytest.mark.parametrize("cls", [SET, RigL])
def test_determinism_for_a_seed(cls):
    def run(seed):
        model = tiny()
        opt = make_optimizer(model, "sgd")
        sp = cls(model, opt, sparsity=0.8, update_every=3, total_steps=20, seed=seed)
        train(model, opt, sp, 20)
        return {n: m.clone() for n, m in sp.masks.masks.items()}

    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_bad_arguments():
    model = tiny()
    with pytest.raises(SparselandError, match="pass the optimizer"):
        RigL(model, None, sparsity=0.9, total_steps=10)
    with pytest.raises(SparselandError, match="sparsity"):
        StaticSparsifier(model, None, sparsity=1.5)
    with pytest.raises(SparselandError, match="selected no parameters"):
        StaticSparsifier(model, None, filter_fn=lambda n, p: False)
    with pytest.raises(SparselandError, match="either config= or keyword"):
        StaticSparsifier(model, None, GMPConfig(), sparsity=0.5)
    with pytest.raises(SparselandError, match="needs a StaticConfig"):
        StaticSparsifier(model, None, GMPConfig())


def test_sparsify_entry_point_creates_masks_once():
    from sparseland.api import sparsify_
    from sparseland.training import StaticConfig

    model = tiny()
    ms = sparsify_(model, StaticConfig(sparsity=0.75, distribution="uniform", seed=3))
    assert ms.density() == pytest.approx(0.25, abs=0.01)
    ms.check()
    only_q = sparsify_(tiny(), StaticConfig(sparsity=0.5), filter_fn=lambda mod, name: name.endswith("q_proj"))
    assert sorted(only_q.masks) == ["model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"]


def test_granet_follows_the_cubic_schedule_and_regrows_what_it_drops():
    model = tiny()
    opt = make_optimizer(model, "adamw")
    sp = GraNet(model, opt, sparsity=0.8, start_step=0, prune_every=3, n_prunes=5, drop_fraction=0.5, total_steps=30)
    seen = []

    def check(t):
        sp.check()
        if sp.is_update_step(t):
            want = sum(
                n_kept(p.numel(), 1 - gmp_sparsity(min(t, sp.config.end_step), sp.config)) for p in sp.params.values()
            )
            kept = sum(int(m.sum()) for m in sp.masks.masks.values())
            assert kept == want  # density on the cubic schedule, regrowth does not change it
            dropped, grown = map(sum, zip(*sp.last_update.values(), strict=True))
            assert dropped == grown
            seen.append(grown)

    train(model, opt, sp, 24, after_step=check)
    assert sp.density() == pytest.approx(0.2, abs=0.01)
    assert sum(seen) > 0  # neuroregeneration happened
