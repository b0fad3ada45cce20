"""Modular: attaching, naming, removing, repr and lifecycle errors."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from tests.hosts import assert_same_state, host_state, logits, make_batch, make_host, randomize


def test_attach_report_counts():
    host = make_host("llama")
    model = pm.Modular(host)
    report = model.add("a", pm.LoRA(rank=4, sites="attn.q"))
    assert report.sites == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert report.trainable_parameters == 2 * (4 * 32 + 32 * 4)
    assert report.host_parameters == sum(p.numel() for p in host.parameters())
    assert "attached lora module 'a' at 2 sites" in str(report)


def test_repr_shows_modules_their_status_and_the_active_composition():
    model = pm.Modular(make_host("llama"))
    model.add("a", pm.LoRA(sites="attn.q"))
    model.add("b", pm.LoRA(sites="attn.v"))
    model.add("c", pm.LoRA(sites="attn.q"))
    model.add("p", pm.PromptTuning(length=2))
    model.use(pm.Stack("a", "b"))
    model.merge_into_host("c")
    lines = repr(model).splitlines()
    assert lines[0] == "Modular(LlamaForCausalLM, family=llama)"
    assert [line.split()[0] for line in lines[1:5]] == ["a", "b", "c", "p"]
    assert [line.split()[-1] for line in lines[1:5]] == ["[active]", "[active]", "[merged]", "[inactive]"]
    assert "a  lora    2 sites" in lines[1] and lines[-1] == "  active: Stack('a', 'b')"


def test_describe_lists_every_site_with_the_modules_acting_there():
    model = pm.Modular(make_host("llama"))
    model.add("a", pm.LoRA(sites="attn.q"))
    model.add("b", pm.LoRA(sites="attn.q|attn.v"))
    model.add("p", pm.PromptTuning(length=2))
    model.use("a")
    model.merge_into_host("b")
    text = model.describe()
    assert text.startswith(repr(model) + "\n")
    sites = text[len(repr(model)) + 1:].splitlines()
    assert sites[0] == "sites: 5"
    # input sites first, then host order; each site names its kind and shape, then its modules
    assert sites[1] == "  <input>  (input)" and sites[2].split() == ["p", "prompt", "inactive"]
    assert sites[3] == "  model.layers.0.self_attn.q_proj  (linear 32->32)"
    assert [line.split() for line in sites[4:6]] == [["a", "lora", "active"], ["b", "lora", "merged"]]
    assert sites[6] == "  model.layers.0.self_attn.v_proj  (linear 32->16)"
    model.unmerge("b")
    model.use(None)
    assert "b  lora  inactive" in model.describe() and "[active]" not in repr(model)


def test_row_plans_follow_the_library_when_a_module_comes_back_changed():
    host = make_host("llama")
    model = pm.Modular(host)
    for name in ("a", "b"):
        model.add(name, pm.LoRA(rank=2, sites="attn.q|attn.v"))
        randomize(model[name], std=0.3)
    batch = make_batch("llama")
    with model.route(["a", "b", "a"]):
        host(**batch)  # compiles and keeps the row plan (and stacks) of this assignment
    # the same Module object (same id, same name) comes back with other parts: nothing cached may survive
    removed = model.remove("a")
    donor = pm.Modular(make_host("llama"))
    donor.add("x", pm.LoRA(rank=2, sites="attn.q|attn.v"))
    randomize(donor["x"], std=0.3)
    removed.parts = donor["x"].parts
    model.add("a", removed)
    with model.route(["a", "b", "a"]):
        routed = host(**batch).logits
    model.use("a")
    alone = host(**{k: v[:1] for k, v in batch.items()}).logits
    torch.testing.assert_close(routed[:1], alone, rtol=1e-5, atol=1e-6)


def test_module_parts_and_sites_must_pair_up():
    site = pm.Site("model.layers.0.self_attn.q_proj", "linear", 32, 32)
    with pytest.raises(pm.ConfigError, match="needs one part per site, got 0 parts for 1 sites"):
        pm.Module(pm.LoRA(), [site], [])


@pytest.mark.parametrize("name", ["", "a.b", "../x", "x" * 200, 3])
def test_bad_names(name):
    model = pm.Modular(make_host("llama"))
    with pytest.raises(pm.ConfigError, match="module name"):
        model.add(name, pm.LoRA())


def test_duplicate_unknown_and_bad_spec():
    model = pm.Modular(make_host("llama"))
    model.add("a", pm.LoRA())
    with pytest.raises(pm.ConfigError, match="already attached"):
        model.add("a", pm.LoRA())
    with pytest.raises(pm.UnknownModuleError, match="'zz', which is not attached"):
        model.use(pm.Stack("a", "zz"))
    with pytest.raises(pm.UnknownModuleError, match="no module named 'zz'"):
        model["zz"]
    with pytest.raises(pm.ConfigError, match="takes a module spec"):
        model.add("c", {"rank": 8})
    with pytest.raises(pm.ConfigError, match="wraps a torch.nn.Module"):
        pm.Modular("not a model")


def test_remove_restores_and_guards_active():
    host = make_host("llama")
    batch, before, state = make_batch("llama"), None, host_state(host)
    before = logits(host, batch)
    model = pm.Modular(host)
    model.add("a", pm.LoRA(sites="attn.q"))
    randomize(model["a"])
    model.use("a")
    with pytest.raises(pm.StateError, match="used by the active composition"):
        model.remove("a")
    model.merge_into_host("a")
    model.use(None)
    removed = model.remove("a")
    assert isinstance(removed, pm.Module) and "a" not in model
    torch.testing.assert_close(logits(host, batch), before, rtol=0, atol=0)
    assert_same_state(host, state)
    assert not any(layer._forward_hooks for layer in host.modules())


def test_merge_errors():
    model = pm.Modular(make_host("llama"))
    model.add("a", pm.LoRA(sites="attn.q"))
    with pytest.raises(pm.StateError, match="not merged"):
        model.unmerge("a")
    model.add("e", pm.LoRA(sites="embed"))
    # tiny llama unties embeddings by default; tie them to check the refusal
    model.host.lm_head.weight = model.host.model.embed_tokens.weight
    with pytest.raises(pm.StateError, match="shared by"):
        model.merge_into_host("e")


def test_merged_module_is_not_applied_twice():
    host = make_host("llama")
    batch = make_batch("llama")
    model = pm.Modular(host)
    model.add("a", pm.LoRA(sites="linear"))
    randomize(model["a"], 0.1)
    model.use("a")
    ref = logits(host, batch)
    model.merge_into_host("a")
    torch.testing.assert_close(logits(host, batch), ref, rtol=1e-4, atol=1e-5)
    assert model.merged == ["a"] and "[merged]" in repr(model)
