"""Composition expressions: equivalences, printing, JSON round trips and node-specific errors."""

from __future__ import annotations

import json

import pytest
import torch

import polymod as pm
from polymod.compose import Mix, Parallel, Stack, from_json, pretty, to_json
from polymod.modules.ia3 import IA3
from polymod.routing import (
    AttentionFusion,
    ExampleRouter,
    HashRouter,
    Polytropon,
    SoftmaxGate,
    SpanRouter,
    Static,
    TaskRouter,
    TopK,
)
from tests.hosts import logits, make_batch, make_host, randomize
from tests.kinds import KINDS


def _model(family: str = "llama", names=("a", "b", "c"), spec=None):
    host = make_host(family)
    model = pm.Modular(host)
    for i, n in enumerate(names):
        model.add(n, spec or pm.LoRA(rank=4, sites="linear"))
        torch.manual_seed(10 + i)
        randomize(model[n], std=0.1)
    return host, model


def _run(host, model, expr, batch, **route):
    model.use(expr)
    with model.route(**route):
        return logits(host, batch)


@pytest.mark.parametrize("family", ["bert", "gpt2", "t5"])
def test_stack_of_one_equals_the_module(family):
    host, model = _model(family)
    batch = make_batch(family)
    torch.testing.assert_close(_run(host, model, Stack("a"), batch), _run(host, model, "a", batch), rtol=0, atol=0)


def test_stack_order_matters_for_nonlinear_kinds():
    host, model = _model("bert", spec=IA3())
    batch = make_batch("bert")
    ab, a = _run(host, model, Stack("a", "b"), batch), _run(host, model, "a", batch)
    assert not torch.allclose(ab, a, atol=1e-4)


def test_one_hot_fixed_router_equals_single_module():
    host, model = _model()
    batch = make_batch("llama")
    alone = _run(host, model, "b", batch)
    mix = Mix(["a", "b", "c"], router=TaskRouter(["a", "b", "c"]))
    torch.testing.assert_close(_run(host, model, mix, batch, task=1), alone, rtol=1e-5, atol=1e-5)
    static = Mix(["a", "b", "c"], router=Static([0.0, 1.0, 0.0]))
    torch.testing.assert_close(_run(host, model, static, batch), alone, rtol=1e-5, atol=1e-5)


def test_example_router_equals_per_row_route():
    host, model = _model()
    batch = make_batch("llama", batch=3)
    names = ["c", "a", None]
    mix = Mix(["a", "b", "c"], router=ExampleRouter())
    model.use(mix)
    with torch.no_grad(), model.route(names=names):
        routed = host(**batch).logits
    model.use(None)
    with torch.no_grad(), model.route(names):
        rows = host(**batch).logits
    torch.testing.assert_close(routed, rows, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", ["token", "example"])
def test_soft_router_with_all_mass_on_one_module_equals_it(level):
    host, model = _model()
    batch = make_batch("llama")
    alone = _run(host, model, "c", batch)
    gate = SoftmaxGate(level=level)
    model.use(Mix(["a", "b", "c"], router=gate))
    with torch.no_grad():
        for site in gate.per_site.values():
            site.bias.copy_(torch.tensor([-60.0, -60.0, 60.0]))
    torch.testing.assert_close(logits(host, batch), alone, rtol=1e-5, atol=1e-5)
    uniform = _run(host, model, Mix(["a", "b", "c"], router=SoftmaxGate(level=level)), batch)
    assert not torch.allclose(uniform, alone, atol=1e-3), "a zero-initialised gate mixes uniformly"


def test_uniform_mix_is_the_average_of_contributions():
    host, model = _model(names=("a", "b"))
    model.use(Mix(["a", "b"]))  # default router: Static() = 1/E each
    batch = make_batch("llama")
    model2 = Mix(["a", "b"], router=Static([0.5, 0.5]))
    torch.testing.assert_close(logits(host, batch), _run(host, model, model2, batch), rtol=0, atol=0)
    assert not torch.allclose(logits(host, batch), _run(host, model, "a", batch), atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_parallel_branches_equal_separate_runs(family):
    host, model = _model(family)
    batch = make_batch(family, batch=2)
    expected = [_run(host, model, b, batch) for b in ("a", Stack("b", "c"))]
    model.use(Parallel("a", Stack("b", "c")))
    with torch.no_grad():
        outs = model(**batch)
    assert len(outs) == 2
    for out, want in zip(outs, expected):
        torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(pm.StateError, match="call model"):
        host(**batch)


def test_stack_prefix_is_shared_by_parallel_branches():
    host, model = _model()
    batch = make_batch("llama", batch=2)
    want = [_run(host, model, Stack("a", b), batch) for b in ("b", "c")]
    model.use(Stack("a", Parallel("b", "c")))
    with torch.no_grad():
        outs = model(**batch)
    for out, w in zip(outs, want):
        torch.testing.assert_close(out.logits, w, rtol=1e-5, atol=1e-5)


def test_json_round_trip_of_nested_expressions():
    exprs = [
        "a",
        Stack("en", Mix([Stack("a", "b"), "c"], router=TopK(k=1, capacity_factor=1.25, overflow="renormalize"))),
        Parallel("a", Stack("en", Mix(["b", "c"], router=Polytropon(n_tasks=3, heads=2), aggregate="factors"))),
        Mix(["a", "b"], router=AttentionFusion(temperature=2.0), aggregate="attention"),
        Mix(["a", Mix(["b", "c"], router=SoftmaxGate(level="example"))], router=TaskRouter({0: "a", 2: None})),
        Mix(["a", "b"], router=Static([0.25, 0.75]), aggregate="output"),
    ]
    for expr in exprs:
        data = json.loads(json.dumps(to_json(expr)))
        back = from_json(data)
        assert to_json(back) == to_json(expr)
        assert str(back) == str(expr)
        assert back == expr


def test_printing_is_readable():
    expr = Stack("en", Mix(["a", "b"], router=TopK(k=2)))
    assert str(expr) == "Stack('en', Mix(['a', 'b'], router=TopK(k=2), aggregate='sum'))"
    long = Mix([Stack(f"language_{i}", f"task_{i}") for i in range(4)], router=TopK(k=2, capacity_factor=1.5))
    lines = pretty(long).splitlines()
    assert lines[0] == "Mix([" and lines[1].strip().startswith("Stack('language_0'") and len(lines) == 6
    host, model = _model(names=("a", "b", "en"))
    model.use(expr)
    assert "active: Stack('en', Mix(['a', 'b'], router=TopK(k=2)" in repr(model)


@pytest.mark.parametrize("bad,error,match", [
    (lambda: Mix([]), pm.CompositionError, "at least one candidate"),
    (lambda: Mix("a"), pm.CompositionError, "list of candidates"),
    (lambda: Mix(["a", "a"]), pm.CompositionError, "distinct, got 'a'"),
    (lambda: Mix(["a"], aggregate=3), pm.CompositionError, "aggregator's name"),
    (lambda: Mix(["a"], router="topk"), pm.CompositionError, "polymod router"),
    (lambda: Stack("a", 3), pm.CompositionError, "module names or compositions, got 3"),
    (lambda: from_json({"mix": ["a"], "router": {"type": "nope"}}), pm.CompositionError, "unknown router type"),
    (lambda: from_json({"stack": "a"}), pm.CompositionError, "not a composition"),
    (lambda: TopK(k=0), pm.ConfigError, "positive integer"),
    (lambda: TopK(overflow="spill"), pm.ConfigError, "'drop' or 'renormalize'"),
])
def test_malformed_expressions_are_refused(bad, error, match):
    with pytest.raises(error, match=match):
        bad()


@pytest.mark.parametrize("expr,error,match", [
    (Stack("a", Mix(["b", "zzz"])), pm.UnknownModuleError, "names module 'zzz'"),
    (Mix(["a", Parallel("b", "c")]), pm.CompositionError, r"Parallel at root > Mix\[1\].*must be the root"),
    (Stack(Parallel("a", "b"), "c"), pm.CompositionError, "Parallel at root > Stack"),
    (Parallel("a", Parallel("b", "c")), pm.CompositionError, "only one"),
    (Stack("a", Mix(["b", "c"], aggregate="output")), pm.CompositionError, r"Mix at root > Stack\[1\].*root"),
    (Mix(["a", "b"], router=TopK(k=1), aggregate="output"), pm.CompositionError, "reads no hidden state"),
    (Mix(["a", "b"], router=TopK(k=3)), pm.CompositionError, "at least 3 candidates"),
    (Mix(["a", "b"], aggregate="max"), pm.CompositionError, r"Mix at root.*aggregate must be one of sum, mean"),
    (Mix(["a", "b"], router=TopK(k=1), aggregate="delta"), pm.CompositionError, "one per token"),
    (Mix(["a", "ia3"], aggregate="factors"), pm.CompositionError, "mixes LoRA's A and B"),
    (Mix(["a", Stack("b", "c")], aggregate="delta"), pm.CompositionError, "must be module names"),
    (Mix(["a", "b"], router=Polytropon(n_tasks=2, heads=2)), pm.CompositionError, "needs aggregate='factors'"),
    (Mix(["a", "b"], aggregate="attention"), pm.CompositionError, "use router=AttentionFusion"),
    (Mix(["a", "b"], router=AttentionFusion(), aggregate="delta"), pm.CompositionError, "one per token"),
    (Mix(["a", "emb"], router=SoftmaxGate()), pm.CompositionError, "embedding site"),
    (Mix(["a", "b"], router=TaskRouter(["a", "c"])), pm.CompositionError, r"maps tasks to \['c'\]"),
    (Mix(["a", "b"], router=Static([1.0])), pm.CompositionError, "1 weights but the Mix has 2"),
])
def test_invalid_compositions_name_the_node_and_why(expr, error, match):
    host, model = _model(names=("a", "b", "c"))
    model.add("ia3", IA3())
    model.add("emb", pm.LoRA(rank=2, sites="embed"))
    with pytest.raises(error, match=match):
        model.use(expr)


def test_a_router_serves_one_mix():
    host, model = _model()
    gate = SoftmaxGate()
    model.use(Mix(["a", "b"], router=gate))
    with pytest.raises(pm.CompositionError, match="already serves another Mix"):
        model.use(Mix(["a", "c"], router=gate))
    model.use(Mix(["a", "b"], router=gate))  # the same Mix again keeps the trained gate


def test_mix_of_compositions_combines_their_contributions():
    host, model = _model()
    batch = make_batch("llama")
    base = _run(host, model, None, batch)
    ab, c = _run(host, model, Stack("a", "b"), batch), _run(host, model, "c", batch)
    mixed = _run(host, model, Mix([Stack("a", "b"), "c"], router=Static([1.0, 1.0])), batch)
    assert not torch.allclose(mixed, ab, atol=1e-4) and not torch.allclose(mixed, base, atol=1e-4)
    one_hot = _run(host, model, Mix([Stack("a", "b"), "c"], router=Static([1.0, 0.0])), batch)
    torch.testing.assert_close(one_hot, ab, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(c, ab, atol=1e-4)


@pytest.mark.parametrize("kind", list(KINDS))
def test_one_hot_mix_equals_the_module_for_every_kind(kind):
    spec = KINDS[kind][0]("gpt2")
    if spec is None:
        pytest.skip(f"{kind} does not apply to gpt2")
    host, model = _model("gpt2", names=("a", "b"), spec=spec)
    batch = make_batch("gpt2", batch=2)
    alone = _run(host, model, "b", batch)
    inputs_only = all(s.kind == "input" for s in model["a"].sites.values())
    aggregate = "input" if kind.startswith(("prompt", "prefix")) else "sum"
    assert inputs_only or aggregate == "sum"
    fixed = _run(host, model, Mix(["a", "b"], router=Static([0.0, 1.0]), aggregate=aggregate), batch)
    torch.testing.assert_close(fixed, alone, rtol=1e-5, atol=1e-5)
    by_task = _run(host, model, Mix(["a", "b"], router=TaskRouter(["a", "b"]), aggregate=aggregate), batch, task=1)
    torch.testing.assert_close(by_task, alone, rtol=1e-5, atol=1e-5)
    if aggregate == "sum":  # token-level fixed routing: hash == the same assignment given as spans
        router = HashRouter()
        hashed = _run(host, model, Mix(["a", "b"], router=router), batch)
        experts = router.expert_of(batch["input_ids"])
        spans = [[(t, t + 1, "ab"[int(e)]) for t, e in enumerate(row)] for row in experts]
        spanned = _run(host, model, Mix(["a", "b"], router=SpanRouter()), batch, spans=spans)
        torch.testing.assert_close(hashed, spanned, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(hashed, alone, atol=1e-6) or bool((experts == 1).all())
    gate = SoftmaxGate(level="example")
    embeds = any(s.kind == "embedding" for s in model["a"].sites.values())
    if aggregate == "input" or embeds:  # prompts/prefixes concatenate; embedding sites give no hidden state
        with pytest.raises(pm.CompositionError, match="aggregate='input'|embedding site"):
            _run(host, model, Mix(["a", "b"], router=gate, aggregate=aggregate), batch)
        return
    model.use(Mix(["a", "b"], router=gate))
    with torch.no_grad():
        for site in gate.per_site.values():
            site.bias.copy_(torch.tensor([-60.0, 60.0]))
        soft = host(**batch).logits
    torch.testing.assert_close(soft, alone, rtol=1e-5, atol=1e-5)
