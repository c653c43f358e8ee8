"""Expert construction: balanced assignment and k-means, activation rates, the expert permutation."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparseland.moe import activation_rates, balanced_assign, balanced_kmeans, build_experts
from sparseland.moe.construct import activation_markers

pytestmark = pytest.mark.usefixtures("one_thread")


@settings(max_examples=30, deadline=None)
@given(clusters=st.integers(1, 6), cap=st.integers(1, 7), seed=st.integers(0, 1000))
def test_balanced_assign_fills_every_cluster_exactly(clusters, cap, seed):
    g = torch.Generator().manual_seed(seed)
    dist = torch.rand(clusters * cap, clusters, generator=g)
    labels = balanced_assign(dist, cap)
    assert torch.bincount(labels, minlength=clusters).tolist() == [cap] * clusters


def test_balanced_assign_takes_the_nearest_when_it_fits():
    dist = torch.tensor([[0.0, 5.0], [5.0, 0.0], [0.1, 4.0], [4.0, 0.2]])
    assert balanced_assign(dist, 2).tolist() == [0, 1, 0, 1]
    # three points want cluster 0, only two fit: the farthest of them moves
    dist = torch.tensor([[0.0, 9.0], [0.1, 9.0], [0.3, 1.0], [5.0, 0.0]])
    assert balanced_assign(dist, 2).tolist() == [0, 0, 1, 1]


def test_balanced_kmeans_recovers_planted_equal_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=g) * 10
    truth = torch.arange(4).repeat_interleave(6)[torch.randperm(24, generator=g)]
    pts = centers[truth] + 0.1 * torch.randn(24, 8, generator=g)
    labels, cents = balanced_kmeans(pts, 4, 20, torch.Generator().manual_seed(1))
    assert torch.bincount(labels).tolist() == [6] * 4
    for c in range(4):  # each found cluster is exactly one planted cluster
        assert truth[labels == c].unique().numel() == 1


def test_activation_rates_count_top_markers():
    h = torch.tensor([[5.0, -4.0, 0.1, 0.0], [0.0, 3.0, -2.0, 0.1]])
    m = activation_markers(h, 0.5)  # top 2 of 4 per token by |h|
    assert m.tolist() == [[True, True, False, False], [False, True, True, False]]
    assert activation_rates(h, 0.5).tolist() == [0.5, 1.0, 0.5, 0.0]


@pytest.mark.parametrize("construction", ["cmoe", "kmeans", "random"])
def test_build_experts_is_a_permutation_with_contiguous_equal_experts(construction):
    h = torch.randn(200, 48, generator=torch.Generator().manual_seed(0))
    h[:, [3, 17, 40]] *= 20  # three neurons fire far more often than the rest
    ex = build_experts(h, 8, 1 if construction != "random" else 0, construction, top=0.125, iters=8, seed=0)
    assert sorted(ex.perm.tolist()) == list(range(48))
    assert ex.expert_size == 6 and ex.n_shared + ex.n_routed * ex.expert_size == 48
    for e, r in enumerate(ex.reps.tolist()):  # the representative lies inside its expert's slice
        assert ex.n_shared + e * 6 <= r < ex.n_shared + (e + 1) * 6
    if construction != "random":  # the always-on neurons are those with the highest activation rates
        assert set([3, 17, 40]) <= set(ex.perm[: ex.n_shared].tolist())


def test_kmeans_groups_co_activating_neurons():
    g = torch.Generator().manual_seed(0)
    groups = torch.arange(4).repeat_interleave(8)[torch.randperm(32, generator=g)]  # 4 planted groups of 8
    which = torch.randint(0, 4, (400,), generator=g)  # each token excites one group
    h = 0.05 * torch.randn(400, 32, generator=g) + (groups[None, :] == which[:, None]).float() * 3
    ex = build_experts(h, 4, 0, "kmeans", top=0.25, iters=10, seed=0)
    for e in range(4):
        assert groups[ex.perm[e * 8 : (e + 1) * 8]].unique().numel() == 1
