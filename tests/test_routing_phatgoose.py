"""PHATGOOSE: gate training with host and module frozen, and top-2 routing by standardised gates."""

from __future__ import annotations

import math

import pytest
import torch

import polymod as pm
from polymod.routing.phatgoose import Phatgoose, PhatgooseGate, standardise
from polymod.training.config import TrainConfig
from polymod.training.recipes.phatgoose import train_gates
from tests.hosts import assert_same_state, host_state, logits, make_batch, make_host, randomize
from tests.test_train_util import classification_data, one_thread  # noqa: F401


def test_gate_training_moves_only_the_gates():
    host = make_host("bert")
    state = host_state(host)
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=4, sites="attn.q|attn.v|classifier"))
    randomize(model["a"], 0.2)
    module_before = {k: v.clone() for k, v in model["a"].state_dict().items()}
    data = classification_data(64)
    gates, result = train_gates(model, "a", data, config=TrainConfig(steps=20, batch_size=16, lr=1e-2, warmup=0,
                                                                      progress=False))
    assert set(gates) == set(model["a"].sites)
    assert all(g.abs().max() > 0 for g in gates.values()), "the gates must have moved from zero"
    assert result.step == 20 and model.active is None
    assert_same_state(host, state)
    for k, v in model["a"].state_dict().items():
        assert torch.equal(v, module_before[k]), k


def test_gate_starts_at_one_half():
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=2, sites="*.q_proj"))
    randomize(model["a"], 0.3)
    batch = make_batch("llama")
    bare = logits(host, batch)
    model.use("a")
    full = logits(host, batch)
    model.use(pm.Mix(["a"], router=PhatgooseGate()))
    half = logits(host, batch)
    assert (full - bare).abs().max() > 1e-3 and not torch.allclose(half, full)
    with pytest.raises(pm.CompositionError, match="gates one module"):
        model.add("b", pm.LoRA(rank=2, sites="*.q_proj"))
        model.use(pm.Mix(["a", "b"], router=PhatgooseGate()))


def test_router_standardises_and_takes_top2_over_present_modules():
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=2, sites="*.q_proj|*.v_proj"))
    model.add("b", pm.LoRA(rank=2, sites="*.q_proj"))  # no gate at v_proj: does not compete there
    model.add("c", pm.LoRA(rank=2, sites="*.q_proj|*.v_proj"))
    g = torch.Generator().manual_seed(0)
    router = Phatgoose(top_k=2)
    with pytest.raises(pm.CompositionError, match="has no gates for a, b, c"):
        model.use(pm.Mix(["a", "b", "c"], router=router))
    gates = {n: {s: torch.randn(32, generator=g) for s in model[n].sites} for n in "abc"}
    for n in "abc":
        router.provide(n, gates[n])
        randomize(model[n], 0.3)
    model.use(pm.Mix(["a", "b", "c"], router=router))
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    x = torch.randn(2, 5, 32, generator=g)
    for site, present in ((q, [0, 1, 2]), (v, [0, 2])):
        w = router.weights(model.routing.inputs, site, x, x)
        table = torch.stack([standardise(gates["abc"[i]][site]) for i in present])
        scores = standardise(x) @ table.t() / math.sqrt(32)  # (2, 5, E')
        top = scores.topk(2, dim=-1)
        want = torch.zeros(2, 5, 3).scatter(-1, torch.tensor(present)[top.indices], torch.softmax(top.values, -1))
        torch.testing.assert_close(w, want, rtol=0, atol=1e-6)
    assert torch.isfinite(logits(host, make_batch("llama"))).all()
    with pytest.raises(pm.ConfigError, match="top_k must be a positive integer"):
        Phatgoose(top_k=0)


def test_gates_published_beside_the_module_and_pulled_with_the_library(tmp_path):
    hub = tmp_path / "hub"
    host = make_host("llama")
    model = pm.Modular(host)
    for name in ("a", "b"):
        model.add(name, pm.LoRA(rank=2, sites="*.q_proj"))
        randomize(model[name], 0.3)
        pm.hub.push(pm.save(model[name], tmp_path / name), f"alice/{name}@1.0.0", hub=hub)
    model.detach()
    lib = pm.hub.library(["alice/a", "alice/b"], host=host, hub=hub)
    with pytest.raises(pm.StateError, match="has no PHATGOOSE gates"):
        lib.phatgoose()
    g = torch.Generator().manual_seed(1)
    for name in lib:
        info = lib.store_gates(name, {s: torch.randn(32, generator=g) for s in lib[name].sites},
                               {"steps": 100, "lr": 1e-3, "data": "toy"})
        assert info.parent == f"alice/{name}@1.0.0" and info.transform == "phatgoose-gates"
    again = pm.hub.library(["alice/a", "alice/b"], host=host, hub=hub)
    router = again.phatgoose(top_k=1)
    model = pm.Modular(host)
    again.attach(model)
    model.use(again.mix(router))
    assert torch.isfinite(logits(host, make_batch("llama"))).all()
