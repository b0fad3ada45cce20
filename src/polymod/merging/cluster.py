"""Clustering a library by the similarity of its modules' weights (the MBC step of Ostapenko et al., 2024).

Model-based clustering groups modules whose weight changes point the same
way, so that one module can then be retrained per cluster (with the existing
trainer) or a cluster merged. Here:

1. each module's weight change is flattened over the union of the library's
   sites (ΔW per site in the host layout; zeros where a module is absent) and
   normalised to unit length, so the geometry is the cosine similarity the
   paper clusters by;
2. the (N, P) matrix is reduced by SVD to its top ``dims`` components
   (computed from the N × N Gram matrix, never a P × P one);
3. k-means (k-means++ seeding, Lloyd iterations, the best of ``restarts``
   seeded runs by inertia) groups the reduced points into ``k`` clusters,
   k chosen by the user.

The result reports every cluster's members and the cosine similarity matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from polymod.errors import ConfigError
from polymod.modules.contract import Module
from polymod.sites import named_layers


@dataclass
class Clustering:
    """Clusters of a library.

    Attributes:
        labels: ``{name: cluster index}``.
        clusters: the members of each cluster, in library order.
        similarity: (N, N) cosine similarity of the flattened weight changes, in library order.
        inertia: the k-means objective of the chosen run (sum of squared distances to the centres).
        explained: the share of the variance kept by the SVD reduction.
    """

    labels: dict[str, int]
    clusters: list[list[str]]
    similarity: torch.Tensor
    inertia: float
    explained: float

    def report(self) -> str:
        """One line per cluster, e.g. ``cluster 0 (3): rt, imdb, sst``."""
        return "\n".join(f"cluster {i} ({len(c)}): {', '.join(c)}" for i, c in enumerate(self.clusters))


def flattened_deltas(modules: Mapping[str, Module], host: nn.Module | None = None) -> torch.Tensor:
    """(N, P) unit-norm rows: each module's ΔW over the union of the library's sites, float32.

    Raises:
        ConfigError: a module has no weight change (adapters, prompts, prefixes).
    """
    bad = [n for n, m in modules.items() if not m.mergeable]
    if bad:
        raise ConfigError(f"clustering compares weight changes ΔW; {bad[0]!r} is a {modules[bad[0]].kind} module, "
                          "which has none (only LoRA, IA³, sparse and Delta modules do)")
    layers = named_layers(host) if host is not None else {}
    deltas = {n: m.delta(layers) for n, m in modules.items()}
    shapes: dict[str, torch.Size] = {}
    for d in deltas.values():
        for site, w in d.items():
            shapes.setdefault(site, w.shape)
    rows = []
    for d in deltas.values():
        pieces = [d[s].detach().float().reshape(-1) if s in d else torch.zeros(shapes[s].numel()) for s in shapes]
        rows.append(torch.cat(pieces))  # (P,)
    x = torch.stack(rows)  # (N, P)
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _kmeans(z: torch.Tensor, k: int, generator: torch.Generator, iters: int = 100) -> tuple[torch.Tensor, float]:
    """One k-means++ seeded Lloyd run on points z (N, d); (labels (N,), inertia)."""
    n = z.shape[0]
    centres = [z[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        dist = torch.cdist(z, torch.stack(centres)).min(1).values.pow(2)  # (N,)
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full((n,), 1.0 / n)
        centres.append(z[torch.multinomial(probs, 1, generator=generator)].squeeze(0))
    c = torch.stack(centres)  # (k, d)
    labels = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new = torch.cdist(z, c).argmin(1)  # (N,)
        if _ > 0 and torch.equal(new, labels):
            break
        labels = new
        for j in range(k):
            members = z[labels == j]
            if len(members):
                c[j] = members.mean(0)
    inertia = float((z - c[labels]).pow(2).sum())
    return labels, inertia


def cluster(modules: Mapping[str, Module], k: int, *, dims: int | None = None, host: nn.Module | None = None,
            seed: int = 0, restarts: int = 10) -> Clustering:
    """Group a library into ``k`` clusters by the similarity of its modules' weight changes.

    Args:
        modules: ``{name: module}``; every module must have a weight change ΔW.
        k: the number of clusters, 1 ≤ k ≤ N.
        dims: SVD components kept (default min(N, 16)).
        host: the host, for kinds whose ΔW reads the host weight (IA³) when not attached.
        seed: seed of the k-means initialisations.
        restarts: seeded k-means runs; the one with the lowest inertia is kept.

    Returns:
        A :class:`Clustering`; clusters are numbered by their first member's position in ``modules``.

    Raises:
        ConfigError: k or dims out of range, or a module without a weight change.
    """
    n = len(modules)
    if not isinstance(k, int) or not 1 <= k <= n:
        raise ConfigError(f"cluster k must be an integer between 1 and the library size {n}, got {k!r}")
    dims = min(n, 16) if dims is None else dims
    if not isinstance(dims, int) or dims < 1:
        raise ConfigError(f"cluster dims must be a positive integer, got {dims!r}")
    x = flattened_deltas(modules, host)  # (N, P)
    gram = x @ x.t()  # (N, N): cosine similarities (unit rows)
    centred = x - x.mean(0, keepdim=True)
    evals, evecs = torch.linalg.eigh(centred @ centred.t())  # ascending; (N,), (N, N)
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    keep = min(dims, n)
    z = evecs[:, :keep] * evals[:keep].sqrt()  # (N, dims): U S, the SVD-reduced points
    explained = float(evals[:keep].sum() / evals.sum().clamp_min(1e-12))
    g = torch.Generator().manual_seed(seed)
    labels, inertia = min((_kmeans(z, k, g) for _ in range(restarts)), key=lambda r: r[1])
    order: dict[int, int] = {}
    for label in labels.tolist():  # renumber clusters by first appearance
        order.setdefault(label, len(order))
    names = list(modules)
    named = {name: order[int(label)] for name, label in zip(names, labels)}
    clusters = [[n for n in names if named[n] == i] for i in range(len(order))]
    return Clustering(named, clusters, gram, inertia, explained)
