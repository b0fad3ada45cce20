"""LoraHub: CMA-ES finds known weights, respects budget, bounds and the L1 penalty, records lineage."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.merging.lorahub import few_shot_loss, lorahub
from tests.hosts import make_host, randomize
from tests.merge_helpers import delta_module, one_thread  # noqa: F401 - one_thread is an autouse fixture

BASIS = {f"m{i}": delta_module({"s": torch.randn(4, 5, generator=torch.Generator().manual_seed(i)).tolist()})
         for i in range(3)}


def quadratic(target_w, basis=BASIS):
    """Loss ‖ΔW(m) − Σ w*_i ΔW_i‖²: minimised exactly at w* (the inputs are linearly independent)."""
    target = sum(w * m.part("s").weight.detach() for w, m in zip(target_w, basis.values()))
    calls = []

    def loss(module):
        calls.append(module)
        return float(((module.part("s").weight.detach() - target) ** 2).sum())

    return loss, calls


def test_cma_es_recovers_known_weights_within_the_budget():
    two = {k: BASIS[k] for k in ("m0", "m1")}
    loss, calls = quadratic([0.8, -0.5], two)
    merged = lorahub(two, loss, budget=120, l1=0.0, seed=1)
    found = merged.card.lineage.recipe["weights"]
    assert found == pytest.approx([0.8, -0.5], abs=0.03)
    assert [p.weight for p in merged.card.lineage.parents] == found
    recipe = merged.card.lineage.recipe
    assert recipe["search"] == "lorahub" and recipe["budget"] == 120 and recipe["evaluations"] == len(calls) <= 120
    assert recipe["loss"] == pytest.approx(0.0, abs=0.05) and recipe["search_seed"] == 1


def test_budget_bounds_penalty_and_seed():
    loss, calls = quadratic([2.5, 0.0, 0.0])  # outside the box
    merged = lorahub(BASIS, loss, budget=25, l1=0.0, bounds=(-1.0, 1.0), seed=0)
    assert len(calls) == 25 == merged.card.lineage.recipe["evaluations"]
    assert all(abs(p.weight) <= 1.0 for p in merged.card.lineage.parents)
    again = lorahub(BASIS, quadratic([2.5, 0.0, 0.0])[0], budget=25, l1=0.0, bounds=(-1.0, 1.0), seed=0)
    assert again.card.lineage.recipe["weights"] == merged.card.lineage.recipe["weights"]
    free = lorahub(BASIS, quadratic([0.6, 0.6, 0.6])[0], budget=40, l1=0.0, seed=2).card.lineage.recipe
    sparse = lorahub(BASIS, quadratic([0.6, 0.6, 0.6])[0], budget=40, l1=200.0, seed=2).card.lineage.recipe
    assert sum(map(abs, sparse["weights"])) < 0.5 * sum(map(abs, free["weights"]))
    assert sparse["objective"] == pytest.approx(sparse["loss"] + 200.0 * sum(map(abs, sparse["weights"])))
    with pytest.raises(pm.ConfigError, match="at least 2 modules"):
        lorahub({"m0": BASIS["m0"]}, loss)
    with pytest.raises(pm.ConfigError, match="budget must be a positive"):
        lorahub(BASIS, loss, budget=0)


def test_few_shot_loss_on_a_host_with_lora_modules():
    model = pm.Modular(make_host("gpt2"))
    for name in ("a", "b"):
        model.add(name, pm.LoRA(rank=2))
        randomize(model[name], 0.05)
    model.use("a")
    ids = torch.randint(3, 96, (2, 6), generator=torch.Generator().manual_seed(0))
    loss = few_shot_loss(model, [{"input_ids": ids, "labels": ids}])
    merged = lorahub({"a": model["a"], "b": model["b"]}, loss, budget=6, seed=0)
    assert merged.kind == "lora" and merged.card.lineage.recipe["lora"] == "ab"
    assert model.active == "a" and model.names() == ["a", "b"]  # the candidate is gone, the composition restored
    assert loss(merged) == pytest.approx(merged.card.lineage.recipe["loss"])
