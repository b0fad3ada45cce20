"""Aggregation at forward time: parameters (ΔW, LoRA factors, MHR), inputs (prompts), outputs (logits)."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.compose import Mix
from polymod.modules.adapter import Adapter
from polymod.modules.prefix import PrefixTuning
from polymod.modules.prompt import PromptTuning
from polymod.routing import Polytropon, Static, TaskRouter, TopK
from polymod.rows import ensemble
from tests.hosts import make_batch, make_host, randomize
from tests.kinds import KINDS


def _model(spec, names=("a", "b"), family="llama"):
    host = make_host(family)
    model = pm.Modular(host)
    for i, n in enumerate(names):
        model.add(n, spec)
        torch.manual_seed(30 + i)
        randomize(model[n], std=0.1)
    return host, model


def _logits(host, model, expr, batch, **route):
    model.use(expr)
    with torch.no_grad(), model.route(**route):
        return host(**batch).logits


MERGEABLE = [k for k in KINDS if k.startswith(("lora", "ia3", "sparse", "delta"))]


@pytest.mark.parametrize("kind", MERGEABLE)
def test_delta_aggregation_equals_the_weighted_sum_of_contributions(kind):
    spec = KINDS[kind][0]("llama")
    if spec is None:
        pytest.skip(f"{kind} does not apply to llama")
    host, model = _model(spec)
    batch = make_batch("llama")
    router = Static([0.3, 0.7])
    delta = _logits(host, model, Mix(["a", "b"], router=router, aggregate="delta"), batch)
    summed = _logits(host, model, Mix(["a", "b"], router=Static([0.3, 0.7])), batch)
    torch.testing.assert_close(delta, summed, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(delta, _logits(host, model, "a", batch), atol=1e-5)


def test_per_example_delta_aggregation_equals_per_row_modules():
    host, model = _model(pm.LoRA(rank=4, sites="linear|embed"))
    batch = make_batch("llama", batch=3)
    mixed = _logits(host, model, Mix(["a", "b"], router=TaskRouter(["a", "b"]), aggregate="delta"), batch,
                    task=[1, 0, 1])
    rows = _logits(host, model, None, batch, rows=["b", "a", "b"])
    torch.testing.assert_close(mixed, rows, rtol=1e-4, atol=1e-5)


def _lora_from(model, name, a, b):
    """Write explicit factors (per site: A (r, D_in), sB (D_out, r)) into module ``name``."""
    with torch.no_grad():
        for site, part in model[name].items():
            part.A.copy_(a[site])
            part.B.copy_(b[site] / part.scaling)


def test_factor_aggregation_mixes_a_and_b_separately():
    host, model = _model(pm.LoRA(rank=4, alpha=8, sites="attn.q|ffn.out"), names=("a", "b", "manual"))
    batch = make_batch("llama")
    w = [0.25, 0.75]
    parts = [dict(model[n].items()) for n in ("a", "b")]
    a = {s: sum(wi * p[s].A for wi, p in zip(w, parts)) for s in parts[0]}
    b = {s: sum(wi * p[s].B * p[s].scaling for wi, p in zip(w, parts)) for s in parts[0]}
    _lora_from(model, "manual", a, b)
    factors = _logits(host, model, Mix(["a", "b"], router=Static(w), aggregate="factors"), batch)
    torch.testing.assert_close(factors, _logits(host, model, "manual", batch), rtol=1e-4, atol=1e-5)
    delta = _logits(host, model, Mix(["a", "b"], router=Static(w), aggregate="delta"), batch)
    assert not torch.allclose(factors, delta, atol=1e-5), "mixing factors is not mixing products"


def test_polytropon_one_hot_allocation_equals_the_skill_and_mhr_mixes_blocks():
    host, model = _model(pm.LoRA(rank=4, sites="attn.q"), names=("s0", "s1", "s2", "manual"))
    batch = make_batch("llama")
    router = Polytropon(n_tasks=2, heads=2)
    model.use(Mix(["s0", "s1", "s2"], router=router, aggregate="factors"))
    router.eval()
    with torch.no_grad():
        for table in router.per_site.values():
            table.logits.fill_(-40.0)
            table.logits[1, :, 2] = 40.0  # task 1 → skill s2 on both heads
            table.logits[0, 0, 0] = table.logits[0, 1, 1] = 40.0  # task 0: head 0 → s0, head 1 → s1
    with torch.no_grad(), model.route(task=1):
        one_hot = host(**batch).logits
    torch.testing.assert_close(one_hot, _logits(host, model, "s2", batch), rtol=1e-4, atol=1e-5)
    model.use(Mix(["s0", "s1", "s2"], router=router, aggregate="factors"))
    with torch.no_grad(), model.route(task=0):
        mhr = host(**batch).logits
    skills = [dict(model[n].items()) for n in ("s0", "s1")]
    a, b = {}, {}
    for site, p0 in skills[0].items():
        p1 = skills[1][site]
        half_in, half_out = p0.A.shape[1] // 2, p0.B.shape[0] // 2
        a[site] = torch.cat([p0.A[:, :half_in], p1.A[:, half_in:]], dim=1)  # input block h from head h's skill
        b[site] = torch.cat([p0.B[:half_out] * p0.scaling, p1.B[half_out:] * p1.scaling], dim=0)
    _lora_from(model, "manual", a, b)
    torch.testing.assert_close(mhr, _logits(host, model, "manual", batch), rtol=1e-4, atol=1e-5)


def test_input_aggregation_concatenates_prompts():
    host, model = _model(PromptTuning(length=2), names=("p1", "p2"), family="gpt2")
    model.add("both", PromptTuning(length=4))
    with torch.no_grad():
        model["both"].part("<input>").prompt.copy_(
            torch.cat([model["p1"].part("<input>").prompt, model["p2"].part("<input>").prompt]))
    batch = make_batch("gpt2")
    concat = _logits(host, model, Mix(["p1", "p2"], aggregate="input"), batch)
    torch.testing.assert_close(concat, _logits(host, model, "both", batch), rtol=1e-5, atol=1e-5)
    with pytest.raises(pm.CompositionError, match="aggregate='input'"):
        _logits(host, model, Mix(["p1", "p2"]), batch)
    with pytest.raises(pm.CompositionError, match="act inside the host"):
        model.add("lora", pm.LoRA(rank=2))
        model.use(Mix(["p1", "lora"], aggregate="input"))


def test_per_row_prompts_of_different_lengths_are_refused_with_the_reason():
    host, model = _model(PromptTuning(length=2), names=("p1",), family="gpt2")
    model.add("p3", PromptTuning(length=3))
    with pytest.raises(pm.StateError, match="prompts/prefixes of one length"):
        with torch.no_grad(), model.route(["p1", "p3", "p1"]):
            host(**make_batch("gpt2"))


def test_output_aggregation_is_a_weighted_ensemble_of_logits():
    host, model = _model(pm.LoRA(rank=4, sites="linear"), family="gpt2")
    batch = make_batch("gpt2", batch=2)
    la, lb = _logits(host, model, "a", batch), _logits(host, model, "b", batch)
    model.use(Mix(["a", "b"], router=Static([0.25, 0.75]), aggregate="output"))
    with torch.no_grad():
        out = model(**batch).logits
    torch.testing.assert_close(out, 0.25 * la + 0.75 * lb, rtol=1e-5, atol=1e-5)
    model.use(Mix(["a", "b"], router=TaskRouter(["a", "b"]), aggregate="output"))
    with torch.no_grad(), model.route(task=[1, 0]):
        per_row = model(**batch).logits
    torch.testing.assert_close(per_row, torch.stack([lb[0], la[1]]), rtol=1e-5, atol=1e-5)
    model.use(None)
    with torch.no_grad():
        plain = ensemble(model, ["a", "b"], **batch)
    torch.testing.assert_close(plain.logits, 0.5 * (la + lb), rtol=1e-5, atol=1e-5)


def test_mean_aggregation_averages_the_selected_candidates():
    host, model = _model(pm.LoRA(rank=4, sites="linear"))
    batch = make_batch("llama")
    mean = _logits(host, model, Mix(["a", "b"], router=TopK(k=2), aggregate="mean"), batch)
    torch.testing.assert_close(mean, _logits(host, model, Mix(["a", "b"]), batch), rtol=1e-5, atol=1e-5)


def test_representation_mix_at_input_sites_of_adapters():
    host, model = _model(Adapter(), family="bert")
    batch = make_batch("bert")
    site = next(iter(model["a"].sites))
    assert site.endswith("<input>"), "Pfeiffer adapters act at the norm's input on BERT"
    one_hot = _logits(host, model, Mix(["a", "b"], router=Static([1.0, 0.0])), batch)
    torch.testing.assert_close(one_hot, _logits(host, model, "a", batch), rtol=1e-5, atol=1e-5)
    half = _logits(host, model, Mix(["a", "b"], router=Static([0.5, 0.5])), batch)
    assert not torch.allclose(half, one_hot, atol=1e-5)
    gate = TopK(k=1)
    out = _logits(host, model, Mix(["a", "b"], router=gate), batch)
    assert out.shape == one_hot.shape and gate.stats.summary()["units"] > 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_input_aggregation_concatenates_prefixes(family):
    host, model = _model(PrefixTuning(length=2), names=("p1", "p2"), family=family)
    model.add("both", PrefixTuning(length=4))
    with torch.no_grad():  # keys and values carry no position: the order of prefixes does not matter
        model["both"].part("<input>").prefix.copy_(
            torch.cat([model["p2"].part("<input>").prefix, model["p1"].part("<input>").prefix]))
    batch = make_batch(family)
    concat = _logits(host, model, Mix(["p1", "p2"], aggregate="input"), batch)
    torch.testing.assert_close(concat, _logits(host, model, "both", batch), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(concat, _logits(host, model, "p1", batch), atol=1e-4)
