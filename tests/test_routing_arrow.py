"""Arrow routing and GenKnowSub: parity with PEFT's create_arrow_model, and what PEFT cannot do."""

from __future__ import annotations

import copy

import pytest
import torch

import polymod as pm
from polymod.compose import from_json
from polymod.interop.peft import write_peft
from polymod.routing import arrow_prototypes
from polymod.routing.arrow import prototype
from tests.hosts import logits, make_batch, make_host, randomize

peft = pytest.importorskip("peft")
if not hasattr(peft, "create_arrow_model"):
    pytest.skip("peft >= 0.17 ships Arrow", allow_module_level=True)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _gapped(module: pm.Module, seed: int, rank: int, scale: float = 2.0) -> None:
    """ΔW = s·B A with singular values scale·(1, 0.3, 0.2, 0.1, …): a clear top direction.

    PEFT finds the prototype by 15 steps of power iteration; with σ₂/σ₁ = 0.3 it has converged to float
    precision, so the comparison tests the routing, not the iteration count.
    """
    g = torch.Generator().manual_seed(seed)
    sv = torch.tensor([1.0] + [0.3 / (i + 1) for i in range(rank - 1)]) * scale
    with torch.no_grad():
        for _, part in module.items():
            d_out, d_in = part.B.shape[0], part.A.shape[1]
            qa, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=g))  # (D_in, r)
            qb, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=g))  # (D_out, r)
            part.A.copy_((qa * sv).t())  # (r, D_in)
            part.B.copy_(qb / part.scaling)  # (D_out, r)


def _library(host, names, rank=4, sites=None, seed=0):
    model = pm.Modular(host)
    for i, name in enumerate(names):
        model.add(name, pm.LoRA(rank=rank, alpha=2 * rank, sites=sites or [f"*.{t}" for t in TARGETS]))
        _gapped(model[name], seed + i, rank, scale=1.5 + 0.5 * i)
    return model


def _peft_arrow(host, model, tasks, general, tmp_path, **config):
    paths = {}
    for name in tasks + general:
        paths[name] = str(write_peft(model[name], tmp_path / name))
    cfg = peft.ArrowConfig(rng_seed=0, use_gks=bool(general), **config)
    return peft.create_arrow_model(host, [paths[n] for n in tasks], cfg,
                                   general_adapter_paths=[paths[n] for n in general] or None).eval()


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (2, 0.5), (3, 2.0)])
def test_outputs_match_peft_arrow(tmp_path, top_k, temperature):
    host = make_host("llama")
    twin_host = copy.deepcopy(host)
    names = ["t0", "t1", "t2", "t3"]
    model = _library(host, names)
    batch = make_batch("llama", batch=3, length=9)
    bare = logits(host, batch)
    model.use(pm.Mix(names, router=pm.Arrow(top_k=top_k, temperature=temperature)))
    ours = logits(host, batch)
    twin = _peft_arrow(twin_host, model, names, [], tmp_path, top_k=top_k, router_temperature=temperature)
    theirs = logits(twin, batch)
    assert (ours - bare).abs().max() > 1e-3, "the modules must matter for the parity to mean anything"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_gen_know_sub_matches_peft_use_gks(tmp_path):
    host = make_host("llama")
    twin_host = copy.deepcopy(host)
    tasks, general = ["t0", "t1", "t2"], ["g0", "g1"]
    model = _library(host, tasks + general)
    purified = pm.gen_know_sub({n: model[n] for n in tasks}, {n: model[n] for n in general})
    for name, module in purified.items():
        model.add(f"{name}-gks", module)
    batch = make_batch("llama", batch=2, length=8)
    model.use(pm.Mix([f"{n}-gks" for n in tasks], router=pm.Arrow(top_k=2, temperature=0.7)))
    ours = logits(host, batch)
    model.use(pm.Mix(tasks, router=pm.Arrow(top_k=2, temperature=0.7)))
    plain = logits(host, batch)
    twin = _peft_arrow(twin_host, model, tasks, general, tmp_path, top_k=2, router_temperature=0.7)
    theirs = logits(twin, batch)
    assert (ours - plain).abs().max() > 1e-3, "subtracting the general modules must change the output"
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    # the inputs are untouched and the lineage names every parent with its weight
    card = purified["t0"].card
    assert [(p.name, p.weight) for p in card.lineage.parents] == [("t0", 1.0), ("g0", -0.5), ("g1", -0.5)]
    assert card.lineage.recipe["method"] == "gen_know_sub"
    assert not torch.equal(purified["t0"].part(next(iter(model["t0"].sites))).A,
                           model["t0"].part(next(iter(model["t0"].sites))).A)


def test_gen_know_sub_delta_mode_is_exact_for_any_ranks():
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("t", pm.LoRA(rank=4, sites="*.q_proj"))
    model.add("g", pm.LoRA(rank=2, sites="*.q_proj"))
    randomize(model["t"]), randomize(model["g"])
    with pytest.raises(pm.ConfigError, match="needs LoRAs of one rank.*use mode='delta'"):
        pm.gen_know_sub({"t": model["t"]}, [model["g"]])
    out = pm.gen_know_sub({"t": model["t"]}, {"g": model["g"]}, mode="delta")["t"]
    assert out.kind == "lora" and out.part(next(iter(out.sites))).rank == 6  # concatenated rank
    for site in model["t"].sites:
        want = model["t"].part(site).delta_weight() - model["g"].part(site).delta_weight()
        torch.testing.assert_close(out.part(site).delta_weight(), want, rtol=0, atol=1e-6)
    assert out.card.lineage.recipe == {"method": "gen_know_sub", "mode": "delta", "general": ["g"]}
    with pytest.raises(pm.ConfigError, match="at least one general module"):
        pm.gen_know_sub({"t": model["t"]}, [])


def _reference_weights(x, protos, present, num, k, tau):
    """Hand-computed Arrow weights for one token x over the present candidates."""
    scores = torch.tensor([abs(float(x @ protos[i])) for i in present])
    keep = scores.argsort(descending=True)[: min(k, len(present))]
    w = torch.zeros(num)
    soft = torch.softmax(scores[keep] / tau, 0)
    for j, s in zip(keep.tolist(), soft):
        w[present[j]] = s
    return w


def test_different_ranks_and_site_sets_absent_module_does_not_compete():
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=2, sites="*.q_proj|*.v_proj"))
    model.add("b", pm.LoRA(rank=6, sites="*.q_proj"))  # absent at v_proj
    model.add("c", pm.LoRA(rank=4, sites="*.q_proj|*.v_proj"))
    for n in "abc":
        randomize(model[n], 0.3)
    router = pm.Arrow(top_k=2, temperature=0.5)
    model.use(pm.Mix(["a", "b", "c"], router=router))
    seen = {}

    def spy(site):
        def hook(mod, args, out):
            seen[site] = args[0].detach()
        return hook

    layers = dict(host.named_modules())
    q, v = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
    handles = [layers[s].register_forward_hook(spy(s)) for s in (q, v)]
    batch = make_batch("llama", batch=2, length=5)
    ours = logits(host, batch)
    for h in handles:
        h.remove()
    for site, present in ((q, [0, 1, 2]), (v, [0, 2])):
        x = seen[site]
        protos = {i: prototype(model[n].part(site), None, "linear") for i, n in enumerate("abc") if i in present}
        w = router.weights(model.routing.inputs, site, x, x)
        assert w.shape == (*x.shape[:-1], 3)
        if site == v:
            assert torch.all(w[..., 1] == 0), "b is absent at v_proj and must not take weight there"
        for t in range(x.shape[1]):
            torch.testing.assert_close(w[0, t], _reference_weights(x[0, t], protos, present, 3, 2, 0.5),
                                       rtol=0, atol=1e-6)
    assert torch.isfinite(ours).all()


def test_prototype_is_the_top_right_singular_vector_without_forming_dw():
    torch.manual_seed(3)
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=5, sites="*.q_proj"))
    randomize(model["a"])
    for _, part in model["a"].items():
        dense = torch.linalg.svd(part.delta_weight(), full_matrices=False)[2][0]
        got = prototype(part, None, "linear")
        assert abs(float(got @ dense)) == pytest.approx(1.0, abs=1e-5)  # equal up to sign


@pytest.mark.parametrize("kind", ["ia3", "sparse", "delta"])
def test_kinds_with_a_weight_change_are_routed_by_their_dense_dw(kind):
    host = make_host("llama")
    model = pm.Modular(host)
    spec = {"ia3": pm.IA3(sites="*.k_proj|*.v_proj"), "sparse": pm.SparseFT(density=0.2, sites="*.k_proj|*.v_proj"),
            "delta": pm.Delta(sites="*.k_proj|*.v_proj")}[kind]
    model.add("x", spec)
    model.add("l", pm.LoRA(rank=2, sites="*.k_proj|*.v_proj"))
    randomize(model["x"], 0.3), randomize(model["l"], 0.3)
    layers = dict(host.named_modules())
    protos = arrow_prototypes(model["x"], layers)
    for site, vec in protos.items():
        dw = model["x"].part(site).delta_weight(layers[site])
        dense = torch.linalg.svd(dw.float(), full_matrices=False)[2][0]
        assert abs(float(vec @ dense)) == pytest.approx(1.0, abs=1e-5)
    batch = make_batch("llama")
    model.use(pm.Mix(["x", "l"], router=pm.Arrow(top_k=1)))
    routed = logits(host, batch)
    stats = next(iter(model.routing.stats().values()))
    assert stats["units"] > 0 and set(stats["load"]) == {"x", "l"}
    assert torch.isfinite(routed).all()


@pytest.mark.parametrize("spec,why", [
    (lambda: pm.Adapter(reduction=4), "not a linear map of the site input"),
    (lambda: pm.PromptTuning(length=3), "not a linear map of the site input"),
])
def test_kinds_without_a_weight_change_are_refused(spec, why):
    model = pm.Modular(make_host("llama"))
    model.add("a", pm.LoRA(rank=2))
    model.add("b", spec())
    with pytest.raises(pm.CompositionError, match=why):
        model.use(pm.Mix(["a", "b"], router=pm.Arrow(top_k=1)))


def test_configuration_errors_and_json():
    with pytest.raises(pm.ConfigError, match="top_k must be a positive integer"):
        pm.Arrow(top_k=0)
    with pytest.raises(pm.ConfigError, match="temperature must be positive"):
        pm.Arrow(temperature=0)
    with pytest.raises(pm.ConfigError, match="level must be 'token'"):
        pm.Arrow(level="example")
    model = pm.Modular(make_host("llama"))
    model.add("a", pm.LoRA(rank=2))
    model.add("b", pm.LoRA(rank=2))
    with pytest.raises(pm.CompositionError, match=r"Arrow\(top_k=3\) needs at least 3 candidates"):
        model.use(pm.Mix(["a", "b"], router=pm.Arrow()))
    with pytest.raises(pm.CompositionError, match="candidates must be module names"):
        model.use(pm.Mix(["a", pm.Stack("a", "b")], router=pm.Arrow(top_k=1)))
    mix = pm.Mix(["a", "b"], router=pm.Arrow(top_k=2, temperature=0.5))
    assert from_json(mix.to_json()) == mix
