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


def test_repr_shows_modules_and_active_composition():
    model = pm.Modular(make_host("llama"))
    model.add("a", pm.LoRA(sites="attn.q"))
    model.add("b", pm.LoRA(sites="attn.v"))
    model.use(pm.Stack("a", "b"))
    text = repr(model)
    assert "a: lora, 2 sites" in text and "active: Stack('a', 'b')" in text


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
