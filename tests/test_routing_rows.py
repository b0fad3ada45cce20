"""Per-example heterogeneous batches: every kind × every tiny host, inference and training."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.compose import Stack
from tests.hosts import FAMILIES, make_batch, make_host, randomize
from tests.kinds import KINDS

CASES = [(k, f) for k in KINDS for f in FAMILIES]


def _setup(kind: str, family: str, names=("a", "b")):
    spec = KINDS[kind][0](family)
    if spec is None:
        pytest.skip(f"{kind} does not apply to {family}")
    host = make_host(family)
    model = pm.Modular(host)
    for i, n in enumerate(names):
        model.add(n, spec)
        torch.manual_seed(100 + i)
        randomize(model[n], std=0.1)
    inputs_only = all(s.kind == "input" for s in model["a"].sites.values())
    return host, model, inputs_only


def _row(batch: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in batch.items()}


@pytest.mark.parametrize("kind,family", CASES)
def test_heterogeneous_batch_equals_each_row_alone(kind, family):
    host, model, inputs_only = _setup(kind, family)
    # input kinds (prompts) need one prompt length on every row; others also take host-only rows and Stacks
    rows = ["b", "a", "b"] if inputs_only else ["a", Stack("b", "a"), None]
    batch = make_batch(family, batch=3)
    with torch.no_grad(), model.route(rows):
        together = host(**batch).logits
    for row in dict.fromkeys(rows):  # rows sharing a composition run together, apart from the others
        picked = [i for i, r in enumerate(rows) if r == row]
        model.use(row)
        with torch.no_grad():
            alone = host(**{k: v[picked] for k, v in batch.items()}).logits
        torch.testing.assert_close(together[picked], alone, rtol=1e-5, atol=1e-5)
    model.use(None)
    with torch.no_grad():
        bare = host(**batch).logits
    changed = together[0] if together.shape == bare.shape else together[0, -bare.shape[1] :]  # prompts add positions
    assert (changed - bare[0]).abs().max() > 1e-6, "row 0 must be changed by its module"


@pytest.mark.parametrize("kind,family", [c for c in CASES if c[1] == "gpt2"])
def test_heterogeneous_batch_gradients_equal_per_row_gradients(kind, family):
    host, model, inputs_only = _setup(kind, family, names=("a", "b", "idle"))
    rows = ["b", "a", "b"] if inputs_only else ["b", "a", None]
    batch = make_batch(family, batch=3)
    with model.route(rows):
        host(**batch).logits.pow(2).sum().backward()
    together = {n: [p.grad.clone() for p in model[n].parameters() if p.requires_grad] for n in ("a", "b")}
    assert all(p.grad is None for p in model["idle"].parameters()), "an unused module gets no gradient"
    assert all(p.grad is None for p in host.parameters()), "the host stays frozen"
    model.zero_grad()
    for i, row in enumerate(rows):
        if row is not None:  # a host-only row has no gradient to give
            model.use(row)
            host(**_row(batch, i)).logits.pow(2).sum().backward()
    for n in ("a", "b"):
        alone = [p.grad for p in model[n].parameters() if p.requires_grad]
        assert any(g.abs().sum() > 0 for g in alone)
        for g1, g2 in zip(together[n], alone):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-5)


def test_rows_are_grouped_once_and_reuse_cached_stacks():
    host, model, _ = _setup("lora-linear-rs", "llama", names=("a", "b", "c"))
    batch = make_batch("llama", batch=4)
    rows = ["a", "c", "b", "c"]
    with torch.no_grad(), model.route(rows):
        first = host(**batch).logits
        plan = model._plan  # the row plan route() put in place for this block
    groups = {id(stage[1]) for op in plan.values() for stage in op.stages}
    assert len(groups) == 1, "every site shares one grouping of the rows"
    with torch.no_grad():  # an in-place update must invalidate the cached stacked weights
        for p in model["c"].parameters():
            p.mul_(2.0)
        with model.route(rows):
            second = host(**batch).logits
        model.use("c")
        alone = host(**_row(batch, 1)).logits
    assert not torch.allclose(first[1], second[1], atol=1e-4)
    torch.testing.assert_close(second[1:2], alone, rtol=1e-5, atol=1e-5)


def test_route_errors_say_why():
    host, model, _ = _setup("lora-attn", "llama")
    batch = make_batch("llama", batch=3)
    with pytest.raises(pm.StateError, match="given 2 rows but .* batch of 3"):
        with torch.no_grad(), model.route(["a", "b"]):
            host(**batch)
    with pytest.raises(pm.UnknownModuleError, match="names module 'zz'"):
        with model.route(["a", "zz", "b"]):
            pass
    with pytest.raises(pm.CompositionError, match="route\\(\\) rows take"):
        with model.route(["a", pm.compose.Mix(["a", "b"]), "b"]):
            pass
    with pytest.raises(pm.ConfigError, match="one composition per row"):
        with model.route("a"):
            pass
    model.merge_into_host("a")
    with pytest.raises(pm.StateError, match="merged into the host"):
        with model.route(["a", "b", "b"]):
            pass


def test_route_restores_the_active_composition():
    host, model, _ = _setup("lora-attn", "gpt2")
    batch = make_batch("gpt2", batch=2)
    model.use("a")
    with torch.no_grad():
        before = host(**batch).logits
        with model.route(["b", None]):
            host(**batch)
        after = host(**batch).logits
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert model.active == "a"


def test_generate_with_per_row_modules_matches_rows_alone():
    host, model, _ = _setup("lora-linear-rs", "llama")
    batch = make_batch("llama", batch=2, length=5)
    with torch.no_grad(), model.route(["a", "b"]):
        out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    for i, name in enumerate(["a", "b"]):
        model.use(name)
        with torch.no_grad():
            alone = model.generate(**_row(batch, i), max_new_tokens=4, do_sample=False)
        assert torch.equal(out[i, : alone.shape[1]], alone[0])  # the longer row may continue past EOS


@pytest.mark.parametrize("length", [1, 3])
def test_few_tokens_per_row_take_the_grouped_path_and_match_rows_alone(length, monkeypatch):
    from polymod.aggregation import lora_mix

    host = make_host("llama")
    model = pm.Modular(host)
    for i, n in enumerate(("a", "b", "c")):
        model.add(n, pm.LoRA(rank=8, sites="linear"))
        torch.manual_seed(i)
        randomize(model[n], std=0.1)
    used = []
    original = lora_mix._grouped_bmm
    monkeypatch.setattr(lora_mix, "_grouped_bmm", lambda *a: used.append(1) or original(*a))
    rows = ["a", None, "c", "a", "c"]  # uneven groups, a host-only row, module b unused
    batch = make_batch("llama", batch=5, length=length)
    with torch.no_grad(), model.route(rows):
        together = host(**batch).logits
    assert used, "2T ≤ r: rows move into per-module groups"
    for row in dict.fromkeys(rows):
        picked = [i for i, r in enumerate(rows) if r == row]
        model.use(row)
        with torch.no_grad():
            torch.testing.assert_close(together[picked], host(**{k: v[picked] for k, v in batch.items()}).logits,
                                       rtol=1e-5, atol=1e-5)
