"""Expert construction from a dense gated MLP: pure tensor functions (no hooks, no modules).

A dense MLP ``down(act(gate(x)) * up(x))`` with I neurons is a sum over neurons, so any partition
of the neurons into experts computes the same function when every expert runs. The construction
only decides which neurons belong together; ``Experts.perm`` orders the neurons so that each
expert is one contiguous slice of gate/up rows and down columns (shared experts first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Experts:
    perm: torch.Tensor  # (I,) int64: new neuron j is old neuron perm[j]
    n_shared: int  # neurons [0, n_shared) are always on
    expert_size: int  # routed expert e holds neurons n_shared + [e * size, (e + 1) * size)
    n_routed: int
    reps: torch.Tensor  # (n_routed,) int64: each routed expert's representative, in the NEW order


def activation_rates(h: torch.Tensor, top: float) -> torch.Tensor:
    """CMoE's activation rate: the fraction of tokens on which a neuron is among the ``top`` fraction
    of largest |h| (h: (N, I) neuron activations act(g) * u). Returns (I,)."""
    return activation_markers(h, top).float().mean(0)


def activation_markers(h: torch.Tensor, top: float) -> torch.Tensor:
    """(N, I) bool: neuron i is among the ceil(top * I) largest |h| of token n."""
    k = max(1, int(round(top * h.shape[1])))
    idx = h.abs().topk(k, dim=1).indices
    return torch.zeros_like(h, dtype=torch.bool).scatter_(1, idx, True)


def balanced_assign(dist: torch.Tensor, capacity: int) -> torch.Tensor:
    """Assign each of P points to one of C clusters, each cluster taking exactly ``capacity`` points
    (P == C * capacity), greedily by ascending distance over all (point, cluster) pairs.
    dist: (P, C). Returns (P,) int64 cluster ids."""
    P, C = dist.shape
    assert C * capacity == P, (P, C, capacity)
    order = dist.flatten().argsort().tolist()
    out = [-1] * P
    fill = [0] * C
    left = P
    for flat in order:
        p, c = divmod(flat, C)
        if out[p] < 0 and fill[c] < capacity:
            out[p] = c
            fill[c] += 1
            left -= 1
            if left == 0:
                break
    return torch.tensor(out, dtype=torch.long)


def balanced_kmeans(
    feats: torch.Tensor, k: int, iters: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Balanced k-means (MoEfication's expert clustering): P points (P, D) into k equal clusters.
    Lloyd iterations whose assignment step is ``balanced_assign``; k-means++ seeding.
    Returns (labels (P,), centroids (k, D))."""
    P = feats.shape[0]
    cap = P // k
    first = int(torch.randint(P, (1,), generator=generator))
    cents = [feats[first]]
    d2 = ((feats - cents[0]) ** 2).sum(1)
    for _ in range(1, k):  # k-means++: next seed drawn with probability ~ squared distance
        nxt = int(torch.multinomial(d2.clamp_min(1e-12), 1, generator=generator))
        cents.append(feats[nxt])
        d2 = torch.minimum(d2, ((feats - feats[nxt]) ** 2).sum(1))
    C = torch.stack(cents)  # (k, D)
    labels = torch.full((P,), -1, dtype=torch.long)
    for _ in range(iters):
        dist = torch.cdist(feats, C)  # (P, k)
        new = balanced_assign(dist, cap)
        if torch.equal(new, labels):
            break
        labels = new
        C = torch.stack([feats[labels == c].mean(0) for c in range(k)])
    return labels, C


def _order(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Neuron indices grouped by label 0..k-1 (stable within a group)."""
    return torch.cat([torch.nonzero(labels == c).flatten() for c in range(k)])


def build_experts(
    h: torch.Tensor, experts: int, shared: int, construction: str, *, top: float, iters: int, seed: int
) -> Experts:
    """Split I neurons into ``experts`` equal experts, ``shared`` of them always on.

    h: (N, I) activations act(g) * u of the dense MLP on calibration tokens.
    - ``random``: a seeded random permutation (shared = the first ``shared`` slices of it).
    - ``kmeans``: shared = highest activation rates, routed = balanced k-means of each neuron's
      L2-normalised |h| profile over the tokens (co-activation, MoEfication).
    - ``cmoe``: shared = highest activation rates, routed = balanced k-means of the binary activation
      markers (CMoE). The representative of an expert is its neuron nearest to the centroid.
    """
    N, I = h.shape
    if I % experts:
        raise ValueError(f"{I} neurons do not split into {experts} equal experts")
    size = I // experts
    g = torch.Generator().manual_seed(seed)
    n_shared = shared * size
    if construction == "random":
        perm = torch.randperm(I, generator=g)
        routed = perm[n_shared:]
        shared_idx = perm[:n_shared]
        feats = h.abs().T[routed]
        feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
        labels = torch.arange(experts - shared).repeat_interleave(size)
        cents = torch.stack([feats[labels == c].mean(0) for c in range(experts - shared)])
    else:
        rates = activation_rates(h, top)
        by_rate = rates.argsort(descending=True, stable=True)
        shared_idx, routed = by_rate[:n_shared].sort().values, by_rate[n_shared:].sort().values
        if construction == "cmoe":
            feats = activation_markers(h, top).T[routed].float()  # (R, N)
        else:
            feats = h.abs().T[routed]
            feats = feats / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
        labels, cents = balanced_kmeans(feats, experts - shared, iters, g)
    order = _order(labels, experts - shared)
    perm = torch.cat([shared_idx, routed[order]])
    # Representative: the member nearest its centroid, as an index in the new order.
    lab_sorted, feats_sorted = labels[order], feats[order]
    dist = (feats_sorted - cents[lab_sorted]).norm(dim=1)
    reps = torch.stack(
        [n_shared + c * size + dist[c * size : (c + 1) * size].argmin() for c in range(experts - shared)]
    )
    return Experts(perm=perm, n_shared=n_shared, expert_size=size, n_routed=experts - shared, reps=reps)


def expert_output_norms(h: torch.Tensor, w_down: torch.Tensor, ex: Experts) -> torch.Tensor:
    """(N, E) norms ||W_down[:, e] h_e|| of each routed expert's output, h (N, I) and w_down (H, I)
    both already in the permuted order."""
    out = []
    for e in range(ex.n_routed):
        s = ex.n_shared + e * ex.expert_size
        sl = slice(s, s + ex.expert_size)
        out.append((h[:, sl] @ w_down[:, sl].T).norm(dim=1))
    return torch.stack(out, 1)
