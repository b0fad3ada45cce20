"""The head module kind (PEFT's modules_to_save): a trainable copy of a layer, saved with the module (ISSUE 14.1)."""

from __future__ import annotations

import warnings

import pytest
import torch

import polymod as pm
from polymod.modules.head import HeadPart
from tests.hosts import logits, make_batch, make_host, randomize


def test_head_copies_the_layer_and_trains_only_the_copy():
    host = make_host("bert")
    batch = make_batch("bert")
    before = logits(host, batch)
    model = pm.Modular(host)
    report = model.add("head", pm.Head(sites="classifier"))
    assert report.sites == ["classifier"] and report.trainable_parameters == 32 * 3 + 3
    model.use("head")
    torch.testing.assert_close(logits(host, batch), before, rtol=0, atol=0)  # the copy is the layer
    model.train()
    host(**batch).logits.pow(2).mean().backward()
    part = model["head"].part("classifier")
    assert part.weight.grad is not None and part.bias.grad is not None
    assert host.classifier.weight.grad is None and not host.classifier.weight.requires_grad


def test_copy_of_a_bias_free_layer_has_a_zero_buffer_not_a_trainable_bias():
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("head", pm.Head(sites="lm_head"))
    part = model["head"].part("lm_head")
    assert isinstance(part, HeadPart) and not isinstance(part.bias, torch.nn.Parameter)
    assert [n for n, _ in model["head"].named_parameters()] == ["parts.lm_head.weight"]
    assert "bias" in part.state_dict() and not part.bias.any()


def test_head_output_is_the_copy_whatever_the_host_layer_holds():
    host = make_host("bert")
    batch = make_batch("bert")
    model = pm.Modular(host)
    model.add("head", pm.Head(sites="classifier"))
    randomize(model["head"])
    model.use("head")
    out = logits(host, batch)
    with torch.no_grad():
        host.classifier.weight.normal_()  # another random head in the host changes nothing
    torch.testing.assert_close(logits(host, batch), out, rtol=0, atol=0)


def test_block_sites_are_refused_with_the_fix():
    host = make_host("bert")
    model = pm.Modular(host)
    with pytest.raises(pm.IncompatibleHostError, match=r"copies leaf layers.*'bert\.pooler\.\*'"):
        model.add("head", pm.Head(sites="bert.pooler"))
    with pytest.raises(pm.ConfigError, match="Head sites must name the layers"):
        pm.Head(sites="")


def test_fresh_process_load_on_another_random_head_gives_no_warning(tmp_path):
    host = make_host("bert", seed=0)
    model = pm.Modular(host)
    model.add("head", pm.Head(sites="classifier"))
    randomize(model["head"])
    model.use("head")
    batch = make_batch("bert")
    want = logits(host, batch)
    pm.save(model["head"], tmp_path / "head")
    assert "weight" not in pm.format.read_card(tmp_path / "head").host["sites"]["classifier"]
    other = make_host("bert", seed=0)  # the same pretrained body, another random classifier
    torch.nn.init.normal_(other.classifier.weight)
    assert not torch.equal(other.classifier.weight, host.classifier.weight)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = pm.load(tmp_path / "head", host=other)
        fresh = pm.Modular(other)
        fresh.add("head", loaded)
    fresh.use("head")
    torch.testing.assert_close(logits(other, batch), want, rtol=0, atol=0)


def test_per_row_routing_of_heads_equals_each_alone():
    host = make_host("bert")
    batch = make_batch("bert", batch=4)
    model = pm.Modular(host)
    for name in ("a", "b"):
        model.add(name, pm.Head(sites="classifier"))
        randomize(model[name])
    alone = {}
    for name in ("a", "b", None):
        model.use(name)
        alone[name] = logits(host, batch)
    model.use(None)
    rows = ["a", None, "b", "a"]
    with model.route(rows):
        mixed = logits(host, batch)
    for i, r in enumerate(rows):
        torch.testing.assert_close(mixed[i], alone[r][i], rtol=1e-5, atol=1e-6)


def test_a_mix_of_heads_weighs_their_outputs():
    host = make_host("bert")
    batch = make_batch("bert")
    model = pm.Modular(host)
    for name in ("a", "b"):
        model.add(name, pm.Head(sites="classifier"))
        randomize(model[name])
    outs = {}
    for name in ("a", "b"):
        model.use(name)
        outs[name] = logits(host, batch)
    model.use(pm.Mix(["a", "b"], router=pm.Static([0.25, 0.75])))
    torch.testing.assert_close(logits(host, batch), 0.25 * outs["a"] + 0.75 * outs["b"], rtol=1e-5, atol=1e-6)


def test_merging_heads_averages_their_weights_and_refuses_task_vectors():
    host = make_host("bert")
    model = pm.Modular(host)
    for name in ("a", "b"):
        model.add(name, pm.Head(sites="classifier"))
        randomize(model[name])
    a, b = model["a"].part("classifier"), model["b"].part("classifier")
    merged = pm.merge({"a": model["a"], "b": model["b"]}, method="linear", weights=[0.25, 0.75])
    assert merged.kind == "head" and merged.card.lineage.recipe["method"] == "linear"
    part = merged.part("classifier")
    torch.testing.assert_close(part.weight, 0.25 * a.weight + 0.75 * b.weight)
    torch.testing.assert_close(part.bias, 0.25 * a.bias + 0.75 * b.bias)
    with pytest.raises(pm.ConfigError, match=r"'ties' merges task vectors.*random draw.*method='linear'"):
        pm.merge({"a": model["a"], "b": model["b"]}, method="ties", density=0.5)
    model.add("lora", pm.LoRA(rank=2, sites="classifier"))
    with pytest.raises(pm.ConfigError, match=r"cannot merge head modules with lora \(lora\).*Merge the heads together"):
        pm.merge({"a": model["a"], "lora": model["lora"]})


def test_merge_error_on_different_host_weights_says_to_use_a_head():
    modules = {}
    for seed in (0, 1):  # two processes: the same body, another random classifier each
        host = make_host("bert", seed=0)
        torch.manual_seed(seed)
        torch.nn.init.normal_(host.classifier.weight)
        model = pm.Modular(host)
        model.add("m", pm.LoRA(rank=2, sites="attn.q|classifier"))
        modules[f"m{seed}"] = model["m"]
    with pytest.raises(pm.IncompatibleHostError, match=r"different host weights.*classifier.*pm\.Head\(sites="):
        pm.merge(modules, method="ties", density=0.5)
