"""Clustering a library by weight similarity (k-means on SVD-reduced flattened ΔW)."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.merging.cluster import flattened_deltas
from tests.hosts import make_host, randomize


def _family_library(groups=3, per_group=3, noise=0.05):
    """Modules in ``groups`` families: each member = its family's LoRA + small noise."""
    model = pm.Modular(make_host("llama"))
    truth = {}
    g = torch.Generator().manual_seed(0)
    bases = [(torch.randn(4, 32, generator=g), torch.randn(32, 4, generator=g)) for _ in range(groups)]
    for fam in range(groups):
        for j in range(per_group):
            name = f"f{fam}m{j}"
            model.add(name, pm.LoRA(rank=4, sites="*.q_proj"))
            with torch.no_grad():
                for _, part in model[name].items():
                    part.A.copy_(bases[fam][0] + noise * torch.randn(4, 32, generator=g))
                    part.B.copy_(bases[fam][1] + noise * torch.randn(32, 4, generator=g))
            truth[name] = fam
    interleaved = sorted(truth, key=lambda n: (n[3], n[1]))  # f0m0, f1m0, f2m0, f0m1, ...
    return {n: model[n] for n in interleaved}, truth


def test_recovers_weight_families():
    modules, truth = _family_library()
    result = pm.cluster(modules, k=3)
    assert len(result.clusters) == 3
    for members in result.clusters:
        assert len({truth[n] for n in members}) == 1, result.report()
    assert result.clusters[0][0] == "f0m0" and result.labels["f0m0"] == 0  # numbered by first appearance
    assert result.similarity.shape == (9, 9) and torch.allclose(result.similarity.diagonal(), torch.ones(9))
    assert result.report().startswith("cluster 0 (3): f0m0, f0m1, f0m2")
    assert 0.9 < result.explained <= 1.0 + 1e-6


def test_deterministic_and_k_bounds():
    modules, _ = _family_library(groups=2, per_group=2)
    a, b = pm.cluster(modules, k=2, seed=3), pm.cluster(modules, k=2, seed=3)
    assert a.labels == b.labels and a.inertia == b.inertia
    assert pm.cluster(modules, k=1).clusters == [list(modules)]
    with pytest.raises(pm.ConfigError, match="between 1 and the library size 4"):
        pm.cluster(modules, k=5)
    with pytest.raises(pm.ConfigError, match="dims must be a positive integer"):
        pm.cluster(modules, k=2, dims=0)


def test_sites_union_and_refused_kinds():
    model = pm.Modular(make_host("llama"))
    model.add("q", pm.LoRA(rank=2, sites="*.q_proj"))
    model.add("qv", pm.LoRA(rank=2, sites="*.q_proj|*.v_proj"))
    model.add("ia3", pm.IA3(sites="*.k_proj|*.v_proj"))
    model.add("ad", pm.Adapter(reduction=4))
    for n in ("q", "qv", "ia3"):
        randomize(model[n], 0.3)
    x = flattened_deltas({n: model[n] for n in ("q", "qv", "ia3")}, model.host)
    assert torch.allclose(x.norm(dim=1), torch.ones(3))
    # "q" is zero on the v_proj block that "qv" fills: the union of sites, zeros where absent
    assert x.shape[1] == 2 * (32 * 32) + 2 * (16 * 32) + 2 * (16 * 32)
    with pytest.raises(pm.ConfigError, match="'ad' is a adapter module, which has none"):
        pm.cluster({"q": model["q"], "ad": model["ad"]}, k=1)
