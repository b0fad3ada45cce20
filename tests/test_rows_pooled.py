"""Pooled row plans (the serving engine's): stacks over every attached module, reused when the batch changes."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.compose import Stack
from tests.hosts import make_batch, make_host, randomize


def _model(specs: dict[str, object]):
    host = make_host("llama")
    model = pm.Modular(host)
    for i, (name, spec) in enumerate(specs.items()):
        model.add(name, spec)
        torch.manual_seed(10 + i)
        randomize(model[name], std=0.1)
    return host, model


def _logits(host, model, rows, batch, pooled: bool) -> torch.Tensor:
    model._row_plans.pooled = pooled
    model._row_plans.clear()
    with torch.no_grad(), model.route(rows):
        return host(**batch).logits


MIXED = {"a": pm.LoRA(rank=4, sites="attn.q|attn.v"), "b": pm.LoRA(rank=4, sites="attn.q|attn.v"),
         "c": pm.LoRA(rank=2, sites="attn.q|attn.v"), "d": pm.IA3(), "e": pm.LoRA(rank=4, sites="attn.q|attn.v")}


@pytest.mark.parametrize("rows", [["a", "b", None, "a"], ["a", "c", "d", "b"], [Stack("a", "d"), "e", "c", None],
                                  ["b", "b", "b", "b"]])
def test_pooled_plans_equal_plans_over_the_used_modules(rows):
    host, model = _model(dict(MIXED))
    batch = make_batch("llama", batch=4)
    torch.testing.assert_close(_logits(host, model, rows, batch, True), _logits(host, model, rows, batch, False),
                               rtol=1e-5, atol=1e-5)


def test_pooled_stacks_survive_a_change_of_the_batchs_modules():
    host, model = _model({n: pm.LoRA(rank=4, sites="attn.q|attn.v") for n in "abcdef"})
    model._row_plans.pooled = True
    batch = make_batch("llama", batch=3)
    built = []
    real = model._stacks.get

    def counting(key, tensors, build, like=None):
        return real(key, tensors, lambda: built.append(key) or build(), like)

    model._stacks.get = counting
    outs = []
    for rows in (["a", "b", "c"], ["d", "e", "f"], ["f", None, "a"]):
        with torch.no_grad(), model.route(rows):
            outs.append(host(**batch).logits)
    sites = len({key[0][0] for key in built})
    assert sites > 0 and len(built) == sites, "one stack per site, built once for the three batches"
    for rows, out in zip((["a", "b", "c"], ["d", "e", "f"], ["f", None, "a"]), outs):  # and the outputs are right
        model._row_plans.pooled = False
        with torch.no_grad(), model.route(rows):
            torch.testing.assert_close(out, host(**batch).logits, rtol=1e-5, atol=1e-5)


def test_pooled_stacks_follow_the_library():
    host, model = _model({"a": pm.LoRA(rank=4, sites="attn.q"), "b": pm.LoRA(rank=4, sites="attn.q")})
    model._row_plans.pooled = True
    batch = make_batch("llama", batch=2)
    with torch.no_grad(), model.route(["a", "b"]):
        host(**batch)
    model.remove("a")
    model.add("a", pm.LoRA(rank=4, sites="attn.q"))
    torch.manual_seed(99)
    randomize(model["a"], std=0.3)
    with torch.no_grad(), model.route(["a", "b"]):
        pooled = host(**batch).logits
    model.use("a")
    with torch.no_grad():
        alone = host(**{k: v[:1] for k, v in batch.items()}).logits
    torch.testing.assert_close(pooled[:1], alone, rtol=1e-5, atol=1e-5)
