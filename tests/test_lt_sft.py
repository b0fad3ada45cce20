"""LT-SFT: the loss falls, only the selected entries change, the host is left as it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polymod as pm
from polymod.training.lt_sft import lt_sft
from tests.hosts import make_batch, make_host


def _regression(seed: int = 0):
    """A two-layer net and batches whose inputs use only features 0-2 (the rest are zero)."""
    torch.manual_seed(seed)
    host = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    teacher = nn.Linear(3, 2)
    batches = []
    for _ in range(4):
        x = torch.zeros(32, 8)
        x[:, :3] = torch.randn(32, 3)
        batches.append((x, teacher(x[:, :3]).detach()))
    return host, batches


def _mse(host, batch):
    x, y = batch
    return nn.functional.mse_loss(host(x), y)


def _loss(host, batches):
    with torch.no_grad():
        return sum(_mse(host, b).item() for b in batches) / len(batches)


def test_lt_sft_lowers_the_loss_and_changes_only_entries_full_fine_tuning_moved():
    host, batches = _regression()
    state = {k: v.clone() for k, v in host.state_dict().items()}
    before = _loss(host, batches)
    module = lt_sft(host, _mse, batches, density=0.1, full_steps=20, sparse_steps=60, lr=1e-2)
    assert all(torch.equal(v, state[k]) for k, v in host.state_dict().items()), "the host is left bit-identical"
    assert all(p.requires_grad for p in host.parameters())
    first = module.part("0")
    assert first.indices.numel() == round(0.1 * 8 * 16)
    # Inputs 3..7 are always zero, so full fine-tuning never moves columns 3..7 of the first layer: LT-SFT
    # must pick its entries among columns 0..2 (flat index = row·8 + column).
    assert set((first.indices.long() % 8).tolist()) <= {0, 1, 2}
    model = pm.Modular(host)
    model.add("sft", module)
    model.use("sft")
    after = _loss(host, batches)
    assert after < 0.5 * before, (before, after)
    model.merge_into_host("sft")
    for site, part in module.items():
        changed = (host.get_submodule(site).weight != state[f"{site}.weight"]).flatten().nonzero().flatten()
        assert changed.numel() > 0 and set(changed.tolist()) <= set(part.indices.tolist())
    assert module.card.lineage.recipe["method"] == "lt-sft"


def test_global_scope_ranks_across_sites_and_survives_save_load(tmp_path):
    host, batches = _regression(1)
    module = lt_sft(host, _mse, batches, density=0.05, scope="global", full_steps=10, sparse_steps=10, lr=1e-2)
    counts = dict(module.spec.counts)
    assert sum(counts.values()) == round(0.05 * (8 * 16 + 16 * 2))
    per_tensor = {"0": round(0.05 * 128), "2": round(0.05 * 32)}
    assert counts != per_tensor, "a global ranking does not give each tensor its density share"
    pm.save(module, tmp_path / "sft")
    loaded = pm.load(tmp_path / "sft")
    for site, part in module.items():
        assert torch.equal(loaded.part(site).indices, part.indices)
        assert torch.equal(loaded.part(site).values, part.values)
    x = batches[0][0]
    model = pm.Modular(host)
    model.add("a", module)
    model.add("b", loaded)
    outs = []
    for name in ("a", "b"):
        model.use(name)
        with torch.no_grad():
            outs.append(host(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_lt_sft_on_a_tiny_causal_lm():
    host = make_host("llama")
    batch = make_batch("llama", batch=4, length=8)

    def lm_loss(h, b):
        return h(**b, labels=b["input_ids"]).loss

    with torch.no_grad():
        before = lm_loss(host, batch).item()
    module = lt_sft(host, lm_loss, [batch], sites="linear", density=0.1, full_steps=5,
                    sparse_steps=20, lr=3e-2)
    model = pm.Modular(host)
    model.add("sft", module)
    model.use("sft")
    with torch.no_grad():
        assert lm_loss(host, batch).item() < before - 0.1


def test_errors():
    host, batches = _regression()
    with pytest.raises(pm.ConfigError, match="scope must be 'tensor' or 'global', got 'layer'"):
        lt_sft(host, _mse, batches, scope="layer")
    with pytest.raises(pm.ConfigError, match="got no batches"):
        lt_sft(host, _mse, [], full_steps=1)
    with pytest.raises(pm.ConfigError, match="full_steps >= 1"):
        lt_sft(host, _mse, batches, full_steps=0)
    with pytest.raises(pm.SiteNotFoundError, match="matched nothing"):
        lt_sft(host, _mse, batches, sites="*.q_proj")
