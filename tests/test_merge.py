"""pm.merge: exact identities, hand-computed TIES/DARE/pruning results, lineage, incompatibilities."""

from __future__ import annotations

import hashlib
from typing import get_args

import pytest
import torch

import polymod as pm
from polymod.format import content_hash
from polymod.merging.merge import merge
from polymod.merging.methods import METHODS, MethodName
from polymod.merging.sparsify import dare_mask, mask_seed
from polymod.modules.delta import Delta
from polymod.modules.ia3 import IA3
from polymod.modules.sparse import SparseFT
from tests.hosts import logits, make_batch, make_host, randomize
from tests.merge_helpers import delta_module, one_thread  # noqa: F401 - one_thread is an autouse fixture

T1 = [[1.0, -2.0, 0.5], [3.0, -0.1, 0.2]]
T2 = [[-1.5, 1.0, 0.4], [2.0, 0.3, -4.0]]
T3 = [[0.2, -0.6, -3.0], [-0.5, 0.1, 1.0]]


@pytest.fixture
def llama_loras():
    model = pm.Modular(make_host("llama"))
    model.add("a", pm.LoRA(rank=4))
    model.add("b", pm.LoRA(rank=2))
    randomize(model["a"], 0.1)
    randomize(model["b"], 0.1)
    return model


def test_merging_one_module_with_weight_one_returns_it(llama_loras):
    a = llama_loras["a"]
    for method in ("linear", "task_arithmetic"):
        m = merge({"a": a}, method, [1.0])
        assert m.kind == "lora"
        for site, part in a.items():
            assert torch.equal(m.part(site).A, part.A) and torch.equal(m.part(site).B, part.B)
    d = delta_module({"x": T1})
    for method, params in (("linear", {}), ("ties", {}), ("dare_linear", {}), ("magnitude_prune", {})):
        assert torch.equal(merge([d], method, [1.0], **params).part("x").weight, d.part("x").weight), method


def test_linear_merge_is_linear(llama_loras):
    a, b = llama_loras["a"], llama_loras["b"]
    m = merge({"a": a, "b": b}, "linear", [0.3, -1.7], lora="delta")
    da, db = a.delta(), b.delta()
    for site, d in m.delta().items():
        torch.testing.assert_close(d, 0.3 * da[site] - 1.7 * db[site], rtol=0, atol=1e-7)
    x, y = delta_module({"s": T1}), delta_module({"s": T2})
    assert torch.equal(merge([x, y], "linear", [2.0, 0.5]).part("s").weight,
                       2.0 * torch.tensor(T1) + 0.5 * torch.tensor(T2))
    avg = merge({"x": x, "y": y})  # default: the mean
    assert torch.equal(avg.part("s").weight, 0.5 * torch.tensor(T1) + 0.5 * torch.tensor(T2))


def test_task_arithmetic_scaling_and_negation_restores(llama_loras):
    a, b = llama_loras["a"], llama_loras["b"]
    ab = merge({"a": a, "b": b}, "task_arithmetic", lam=0.5)
    for site, d in ab.delta().items():
        torch.testing.assert_close(d, 0.5 * (a.delta()[site] + b.delta()[site]), rtol=0, atol=1e-7)
    both = merge({"a": a, "b": b}, "task_arithmetic")
    back = merge({"ab": both, "b": b}, "task_arithmetic", [1.0, -1.0])  # negation then addition
    for site, d in back.delta().items():
        torch.testing.assert_close(d, a.delta()[site], rtol=0, atol=1e-6)


def test_ties_on_hand_made_tensors():
    mods = {"m1": delta_module({"s": T1}), "m2": delta_module({"s": T2}), "m3": delta_module({"s": T3})}
    # density 0.5 keeps 3 of 6 entries per input; signs elected by the sum; disjoint mean.
    got = merge(mods, "ties", density=0.5).part("s").weight
    torch.testing.assert_close(got, torch.tensor([[-1.5, -1.3, -3.0], [2.5, 0.0, -4.0]]), rtol=0, atol=1e-7)
    # weighted (mergekit's definition): Σ w_i τ_i over agreeing inputs / Σ w_i over them
    got = merge(mods, "ties", [1.0, 2.0, 1.0], density=0.5).part("s").weight
    torch.testing.assert_close(got, torch.tensor([[-1.5, -1.3, -3.0], [7 / 3, 0.0, -4.0]]), rtol=0, atol=1e-6)
    got = merge(mods, "ties", density=0.5, normalize=False, lam=2.0).part("s").weight  # sum of agreeing, × λ
    torch.testing.assert_close(got, 2 * torch.tensor([[-1.5, -2.6, -3.0], [5.0, 0.0, -4.0]]), rtol=0, atol=1e-6)


def test_ties_global_trimming_is_per_module_not_per_tensor():
    big = [[10.0, 20.0], [30.0, 40.0]]
    a = delta_module({"s": T1, "t": big})
    b = delta_module({"s": T2, "t": [[-1.0, 1.0], [1.0, 1.0]]})
    # 10 entries per input, density 0.5 keeps 5: for a that is all of t plus the 3.0 in s.
    got = merge({"a": a, "b": b}, "ties", density=0.5, trim="global")
    # b's top 5 over s and t: 4.0, 2.0, 1.5, then five entries tie at 1.0: the paper's code keeps every tie.
    torch.testing.assert_close(got.part("s").weight, torch.tensor([[-1.5, 1.0, 0.0], [2.5, 0.0, -4.0]]),
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(got.part("t").weight, torch.tensor([[10.0, 10.5], [15.5, 20.5]]), rtol=0, atol=1e-6)
    per_tensor = merge({"a": a, "b": b}, "ties", density=0.5)
    assert not torch.equal(per_tensor.part("s").weight, got.part("s").weight)
    with pytest.raises(pm.ConfigError, match="dare_ties does not take trim"):
        merge({"a": a, "b": b}, "dare_ties", density=0.5, trim="global")


def test_magnitude_prune_and_breadcrumbs_by_hand():
    t = [[0.1, -5.0, 0.3], [2.0, -0.05, 1.0]]
    m = delta_module({"s": t})
    got = merge([m], "magnitude_prune", [1.0], density=0.5).part("s").weight
    assert torch.equal(got, torch.tensor([[0.0, -5.0, 0.0], [2.0, 0.0, 1.0]]))
    # Breadcrumbs: drop the top gamma·n = 1 entry (the outlier −5), keep the next density·n = 3.
    got = merge([m], "breadcrumbs", [1.0], density=0.5, gamma=1 / 6 + 1e-9).part("s").weight
    assert torch.equal(got, torch.tensor([[0.0, 0.0, 0.3], [2.0, 0.0, 1.0]]))


def test_dare_matches_its_definition_and_is_reproducible():
    mods = {"m1": delta_module({"s": T1}), "m2": delta_module({"s": T2})}
    got = merge(mods, "dare_linear", [0.5, 1.0], density=0.6, seed=7).part("s").weight
    masks = [dare_mask(7, "s.weight", i, 6, 0.6).view(2, 3) for i in range(2)]
    want = 0.5 * (torch.tensor(T1) * masks[0] / 0.6) + (torch.tensor(T2) * masks[1] / 0.6)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)
    gen = torch.Generator().manual_seed(mask_seed(7, "s.weight", 1, 0))
    assert torch.equal(masks[1].view(-1), torch.bernoulli(torch.full((6,), 0.6), generator=gen))
    again = merge(mods, "dare_linear", [0.5, 1.0], density=0.6, seed=7).part("s").weight
    assert torch.equal(got, again)
    # mergekit's rescaling: match each task vector's L1 norm
    l1 = merge(mods, "dare_linear", [1.0, 1.0], density=0.6, seed=7, rescale="l1").part("s").weight
    kept = [torch.tensor(t) * m for t, m in zip((T1, T2), masks)]
    scales = [torch.tensor(t).abs().sum() / k.abs().sum() for t, k in zip((T1, T2), kept)]
    torch.testing.assert_close(l1, kept[0] * scales[0] + kept[1] * scales[1], rtol=1e-6, atol=1e-7)


def test_dare_seed_reproducible_on_a_real_module(llama_loras):
    a, b = llama_loras["a"], llama_loras["b"]
    one = merge({"a": a, "b": b}, "dare_ties", density=0.3, seed=3)
    two = merge({"a": a, "b": b}, "dare_ties", density=0.3, seed=3)
    other = merge({"a": a, "b": b}, "dare_ties", density=0.3, seed=4)
    assert all(torch.equal(one.delta()[s], two.delta()[s]) for s in one.sites)
    assert not all(torch.equal(one.delta()[s], other.delta()[s]) for s in one.sites)
    kept = sum(int((d != 0).sum()) for d in one.delta().values()) / sum(d.numel() for d in one.delta().values())
    assert 0.35 < kept < 0.65  # two inputs kept with p = 0.3 each: 1 − 0.7² ≈ 0.51 non-zero


def test_lineage_on_the_card_and_a_save_load_round_trip(llama_loras, tmp_path):
    a, b = llama_loras["a"], llama_loras["b"]
    a.card.version = "1.0.0"
    m = merge({"a": a, "b": b}, "ties", [1.0, 0.5], density=0.2, seed=5, name="ab")
    lineage = m.card.lineage
    assert [(p.name, p.version, p.weight) for p in lineage.parents] == [("a", "1.0.0", 1.0), ("b", None, 0.5)]
    pm.save(a, tmp_path / "a")
    assert lineage.parents[0].sha256 == hashlib.sha256((tmp_path / "a/weights.safetensors").read_bytes()).hexdigest()
    assert lineage.parents[1].sha256 == content_hash(b)
    assert lineage.recipe == {"method": "ties", "weights": [1.0, 0.5], "lambda": 1.0, "normalize": True,
                              "density": [0.2, 0.2], "trim": "tensor", "consensus": "sum", "seed": 5,
                              "lora": "delta", "result": "sparse"}  # ≤ 40% non-zero: the smaller exact form
    assert lineage.describe().startswith("ties(weights=[1.0, 0.5]") and lineage.describe().endswith("of a@1.0.0, b")
    pm.save(m, tmp_path / "ab")
    loaded = pm.load(tmp_path / "ab")
    assert loaded.card.lineage == lineage and loaded.card.name == "ab"
    host = llama_loras.host
    batch = make_batch("llama")
    llama_loras.add("ab", loaded)
    llama_loras.use("ab")
    out = logits(host, batch)
    llama_loras.use(None)
    llama_loras.remove("ab")
    llama_loras.add("ab2", m)
    llama_loras.use("ab2")
    assert torch.equal(logits(host, batch), out)


def test_mixed_kinds_merge_into_a_dense_delta_including_biases():
    host = make_host("bert")
    model = pm.Modular(host)
    model.add("lora", pm.LoRA(rank=2, sites="attn.q|attn.v"))
    model.add("ia3", IA3(sites="attn.q|attn.v", feedforward=""))
    model.add("sparse", SparseFT(density=0.2, sites="attn.q|attn.v"))
    for name in ("lora", "ia3", "sparse"):
        randomize(model[name], 0.1)
    merged = merge({n: model[n] for n in ("lora", "ia3", "sparse")}, "task_arithmetic")
    assert merged.kind == "delta" and merged.spec.bias
    batch = make_batch("bert")
    for name in ("ia3", "lora", "sparse"):  # IA³ first: its ΔW scales the original host weight
        model.merge_into_host(name)
    want = logits(host, batch)
    for name in ("sparse", "lora", "ia3"):
        model.unmerge(name)
    model.add("merged", merged)
    model.use("merged")
    torch.testing.assert_close(logits(host, batch), want, rtol=1e-5, atol=1e-5)


def test_sparse_modules_merge_sparse_on_the_union_of_entries():
    model = pm.Modular(make_host("gpt2"))
    model.add("a", SparseFT(density=0.05, seed=1, sites="ffn.out"))
    model.add("b", SparseFT(density=0.05, seed=2, sites="ffn.out"))
    randomize(model["a"])
    randomize(model["b"])
    m = merge({"a": model["a"], "b": model["b"]}, "task_arithmetic")
    assert m.kind == "sparse"
    for site in m.sites:
        union = set(model["a"].part(site).indices.tolist()) | set(model["b"].part(site).indices.tolist())
        assert set(m.part(site).indices.tolist()) == union
        torch.testing.assert_close(m.delta()[site], model["a"].delta()[site] + model["b"].delta()[site])
    dense = merge({"a": model["a"], "b": model["b"]}, "task_arithmetic", result="dense")
    assert dense.kind == "delta"


def test_incompatible_inputs_say_which(llama_loras):
    a = llama_loras["a"]
    gpt = pm.Modular(make_host("gpt2"))
    gpt.add("g", pm.LoRA(rank=4))
    with pytest.raises(pm.IncompatibleHostError, match="'a' and 'g': they were made for different hosts"):
        merge({"a": a, "g": gpt["g"]})
    llama_loras.add("q", pm.LoRA(rank=4, sites="attn.q"))
    with pytest.raises(pm.IncompatibleHostError, match="different sites; only 'a' acts at model.layers.0.self_attn.v"):
        merge({"a": a, "q": llama_loras["q"]})
    other = pm.Modular(make_host("llama", seed=1))
    other.add("o", pm.LoRA(rank=4))
    with pytest.raises(pm.IncompatibleHostError, match="different host weights at 4 sites"):
        merge({"a": a, "o": other["o"]})
    x, y = delta_module({"s": T1}, "x"), delta_module({"s": [[1.0, 2.0], [3.0, 4.0]]}, "y")
    with pytest.raises(pm.IncompatibleHostError, match="site 's' is a linear 3->2 in 'x' but a linear 2->2 in 'y'"):
        merge([x, y])


def test_bad_arguments_are_config_errors(llama_loras):
    a, b = llama_loras["a"], llama_loras["b"]
    with pytest.raises(pm.ConfigError, match="unknown merge method 'tie'"):
        merge([a, b], "tie")
    with pytest.raises(pm.ConfigError, match="linear does not take density"):
        merge([a, b], "linear", density=0.5)
    with pytest.raises(pm.ConfigError, match="density must be in"):
        merge([a, b], "ties", density=1.5)
    with pytest.raises(pm.ConfigError, match="one number per module"):
        merge([a, b], "linear", [1.0])
    a.card.name = b.card.name = "same"
    with pytest.raises(pm.ConfigError, match="distinct names"):
        merge([a, b])
    model = pm.Modular(make_host("llama"))
    from polymod.modules.prompt import PromptTuning

    model.add("p", PromptTuning(length=2))
    with pytest.raises(pm.StateError, match="has no weight delta"):
        merge({"a": a, "p": model["p"]})


def test_a_delta_with_bias_needs_host_biases():
    model = pm.Modular(make_host("llama"))
    with pytest.raises(pm.IncompatibleHostError, match="has no bias; use Delta.bias=False."):
        model.add("d", Delta(bias=True, sites="attn.v"))


def test_method_name_type_lists_exactly_the_registered_methods():
    assert set(get_args(MethodName)) == set(METHODS), "pm.merge(method=...) is typed with MethodName"
