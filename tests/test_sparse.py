"""Sparse fine-tuning: sparse storage, the diff's math, masks, merging, errors."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import polymod as pm
from polymod.modules.sparse import SparseFT
from tests.hosts import make_host


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.lin = nn.Linear(6, 8)
        self.conv = Conv1D(5, 8)  # y = x W + b with W (8, 5)

    def forward(self, ids):
        return self.conv(torch.tanh(self.lin(self.emb(ids))))


def _attached(spec: SparseFT):
    torch.manual_seed(0)
    host = Toy().eval()
    model = pm.Modular(host)
    model.add("m", spec)
    with torch.no_grad():
        for p in model["m"].parameters():
            p.normal_(0, 0.5)
    model.use("m")
    return host, model


def test_forward_is_the_host_with_the_diff_added_at_the_stored_entries():
    host, model = _attached(SparseFT(density=0.2, sites="emb|lin|conv"))
    ids = torch.randint(0, 11, (2, 4))
    reference = Toy()
    reference.load_state_dict(host.state_dict())
    with torch.no_grad():  # apply the diff entry by entry, by hand
        for site, part in model["m"].items():
            flat = getattr(reference, site).weight.view(-1)
            for i, v in zip(part.indices.tolist(), part.values.tolist()):
                flat[i] += v
        torch.testing.assert_close(host(ids), reference(ids), rtol=1e-5, atol=1e-6)


def test_storage_is_sparse_indices_and_values(tmp_path):
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("m", SparseFT(density=0.02))
    state = model["m"].state_dict()
    assert {k.rsplit(".", 1)[-1] for k in state} == {"indices", "values"}
    assert all(v.dtype == torch.int32 for k, v in state.items() if k.endswith("indices"))
    dense = sum(host.get_submodule(s).weight.numel() for s in model["m"].sites)
    entries = sum(p.values.numel() for _, p in model["m"].items())
    assert entries == sum(max(1, round(0.02 * host.get_submodule(s).weight.numel())) for s in model["m"].sites)
    stored = sum(v.numel() * v.element_size() for v in state.values())
    assert stored == entries * (4 + 4) and stored < 0.05 * dense * 4
    pm.save(model["m"], tmp_path / "m")
    on_disk = load_file(str(tmp_path / "m" / "weights.safetensors"))
    assert sum(v.numel() for v in on_disk.values()) == 2 * entries  # nothing dense was written


def test_random_mask_is_seeded_per_site_and_unique():
    site = pm.Site("a.lin", "linear", 6, 8)
    layer = nn.Linear(6, 8)
    idx = SparseFT(density=0.25, seed=1).build_part(site, layer).indices
    assert idx.numel() == 12 and idx.unique().numel() == 12 and torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, SparseFT(density=0.25, seed=1).build_part(site, layer).indices)
    assert not torch.equal(idx, SparseFT(density=0.25, seed=2).build_part(site, layer).indices)
    other = pm.Site("b.lin", "linear", 6, 8)
    assert not torch.equal(idx, SparseFT(density=0.25, seed=1).build_part(other, layer).indices)


def test_magnitude_mask_keeps_the_largest_host_entries():
    layer = nn.Linear(10, 7)
    part = SparseFT(density=0.1, mask="magnitude").build_part(pm.Site("l", "linear", 10, 7), layer)
    mags = layer.weight.detach().abs().flatten()
    chosen = torch.zeros_like(mags, dtype=torch.bool)
    chosen[part.indices.long()] = True
    assert chosen.sum() == 7 and mags[chosen].min() > mags[~chosen].max()


def test_merge_changes_only_the_stored_entries_and_unmerge_restores():
    host, model = _attached(SparseFT(density=0.1, sites="lin|conv"))
    before = {k: v.clone() for k, v in host.state_dict().items()}
    ids = torch.randint(0, 11, (3, 5))
    with torch.no_grad():
        unmerged = host(ids)
        model.merge_into_host("m")
        torch.testing.assert_close(host(ids), unmerged, rtol=1e-5, atol=1e-6)
    for site, part in model["m"].items():
        changed = (getattr(host, site).weight != before[f"{site}.weight"]).flatten().nonzero().flatten()
        assert set(changed.tolist()) <= set(part.indices.tolist()) and changed.numel() > 0
    model.unmerge("m")
    assert all(torch.equal(v, before[k]) for k, v in host.state_dict().items())


def test_gradients_reach_only_the_values():
    host, model = _attached(SparseFT(density=0.1, sites="lin"))
    model.train()
    host(torch.randint(0, 11, (2, 3))).pow(2).sum().backward()
    part = model["m"].part("lin")
    assert part.values.grad is not None and part.values.grad.abs().sum() > 0
    assert host.lin.weight.grad is None and not part.indices.requires_grad


def test_errors():
    with pytest.raises(pm.ConfigError, match=r"density must be in \(0, 1\], got 0"):
        SparseFT(density=0)
    with pytest.raises(pm.ConfigError, match="mask must be one of random, magnitude, lt-sft, got 'top'"):
        SparseFT(mask="top")
    with pytest.raises(pm.ConfigError, match="counts must be"):
        SparseFT(counts=(("a",),))
    model = pm.Modular(Toy())
    with pytest.raises(pm.ConfigError, match="build the module with polymod.training.lt_sft.lt_sft"):
        model.add("m", SparseFT(mask="lt-sft", sites="lin"))
    with pytest.raises(pm.IncompatibleHostError, match="not on whole blocks"):
        pm.Modular(make_host("llama")).add("m", SparseFT(sites="block.out"))
