"""Hypernetwork LoRA: routed like every kind, live == materialised, per-row routing, new tasks, save/load, errors."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.modules import hyperlora
from polymod.modules.contract import ReadsRoutingInputs
from polymod.modules.hyperlora import HyperLoRA, HyperLoRAPart, hypernetwork
from polymod.sites import Site
from tests.hosts import make_batch, make_host, randomize

SPEC = HyperLoRA(tasks=("sst2", "mnli"), languages=("en", "de"), rank=2, embedding_dim=6, hidden=12,
                 sites="attn.q|attn.v|ffn.in")


def _attach(family: str = "llama", spec: HyperLoRA = SPEC):
    host = make_host(family)
    model = pm.Modular(host)
    model.add("hx", spec)
    randomize(model["hx"], std=0.3)
    model.use("hx")
    return host, model


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_materialised_lora_equals_the_live_module_routed_to_its_task(family):
    host, model = _attach(family)
    batch = make_batch(family)
    with model.route(task="mnli", language="de"):
        live = host(**batch).logits
    lora = hyperlora.materialise(model["hx"], task="mnli", language="de")
    assert lora.kind == "lora" and set(lora.sites) == set(model["hx"].sites) and lora.mergeable
    assert lora.card.lineage.recipe == {"method": "materialise", "task": "mnli", "language": "de"}
    model.add("mnli-de", lora)
    model.use("mnli-de")
    torch.testing.assert_close(host(**batch).logits, live, rtol=1e-5, atol=1e-6)
    if family == "llama":  # GPT-2 ties no attention weights either, but one merge check suffices
        model.merge_into_host("mnli-de")
        torch.testing.assert_close(host(**batch).logits, live, rtol=1e-4, atol=1e-5)
        model.unmerge("mnli-de")
    model.use("hx")
    with model.route(task="sst2", language="en"):
        assert not torch.allclose(host(**batch).logits, live, atol=1e-4), "another task generates other weights"
    default = host(**batch).logits  # no route: the first task and language
    with model.route(task="sst2", language="en"):
        torch.testing.assert_close(host(**batch).logits, default, rtol=0, atol=0)
    with model.route(task=1):  # task ids are for task-level routers (their candidates), not the hypernetwork
        torch.testing.assert_close(host(**batch).logits, default, rtol=0, atol=0)


def test_per_row_routing_equals_each_row_alone():
    host, model = _attach()
    batch = make_batch("llama")
    rows = [("sst2", "en"), ("mnli", "de"), ("sst2", "de")]
    with model.route(task=[t for t, _ in rows], language=[g for _, g in rows]):
        together = host(**batch).logits
    for i, (task, language) in enumerate(rows):
        with model.route(task=task, language=language):
            alone = host(**{k: v[i:i + 1] for k, v in batch.items()}).logits
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(pm.StateError, match="gives 3 rows but the batch at this site has 2"):
        with model.route(task=["sst2", "mnli", "sst2"]):
            host(**make_batch("llama", batch=2))


def test_parts_read_the_models_routing_inputs_and_share_one_hypernetwork():
    _, model = _attach()
    parts = list(model["hx"].parts.values())
    assert all(isinstance(p, ReadsRoutingInputs) and p.inputs is model.routing.inputs for p in parts)
    net = hypernetwork(model["hx"])
    assert all(p.generator is net for p in parts)
    owners = [n for n, _ in model["hx"].named_children()]  # the network is saved once, under the first site
    state = model["hx"].state_dict()
    assert sum(k.endswith("trunk.weight") for k in state) == 1, sorted(state)[:5]
    assert "<input>" not in "".join(model["hx"].sites) and owners == ["parts"]


def test_heads_are_shared_by_sites_of_one_shape():
    _, model = _attach()
    net = hypernetwork(model["hx"])
    assert sorted(net.heads) == ["32x16", "32x32", "32x48"]  # q (32->32), v (GQA: 32->16), ffn.in (32->48)
    trunk = net.trunk.weight.numel() + net.trunk.bias.numel()
    heads = sum(p.numel() for p in net.heads.parameters())
    sites = len(model["hx"].sites) * 6
    assert model["hx"].num_parameters() == trunk + heads + sites + 4 * 6  # + 2 task and 2 language embeddings


def test_new_task_is_a_new_embedding_and_survives_save_load(tmp_path):
    host, model = _attach()
    batch = make_batch("llama")
    hyperlora.add_task(model["hx"], "qnli")
    assert model["hx"].spec.tasks == ("sst2", "mnli", "qnli") and model["hx"].card.config["tasks"][-1] == "qnli"
    net = hypernetwork(model["hx"])
    torch.testing.assert_close(net.task_embeddings[2], net.task_embeddings[:2].mean(0))
    with torch.no_grad():
        net.task_embeddings[2] += 0.5
    with model.route(task="qnli", language="de"):
        expected = host(**batch).logits
    pm.save(model["hx"], tmp_path / "hx")
    loaded = pm.load(tmp_path / "hx")
    assert all(isinstance(p, HyperLoRAPart) for p in loaded.parts.values())
    model.use(None)
    model.add("again", loaded)
    model.use("again")
    with model.route(task="qnli", language="de"):
        torch.testing.assert_close(host(**batch).logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(pm.ConfigError, match="distinct names"):
        hyperlora.add_task(model["again"], "qnli")


def test_routing_errors():
    host, model = _attach()
    batch = make_batch("llama")
    with pytest.raises(pm.ConfigError, match="unknown task 'cola'.*add_task"):
        with model.route(task="cola"):
            host(**batch)
    with pytest.raises(pm.ConfigError, match="one entry per row: 2 tasks, 3 languages"):
        with model.route(task=["sst2", "mnli"], language=["en", "de", "en"]):
            host(**batch)
    with pytest.raises(pm.ConfigError, match="language name or one per row"):
        with model.route(language=3):
            pass
    bare = pm.Modular(make_host("llama"))
    bare.add("h", HyperLoRA(rank=2))
    bare.use("h")
    with pytest.raises(pm.ConfigError, match="has no languages"):
        with bare.route(task="default", language="en"):
            bare.host(**batch)
    with pytest.raises(pm.ConfigError, match="made without languages"):
        hyperlora.add_language(bare["h"], "en")
    bare.add("l", pm.LoRA(rank=2))
    with pytest.raises(pm.ConfigError, match="expected a hyper-lora module"):
        hyperlora.add_task(bare["l"], "default")


@pytest.mark.parametrize("kwargs,match", [
    ({"tasks": ()}, "at least one task"),
    ({"tasks": ("a", "a")}, "distinct names"),
    ({"tasks": ("a.b",)}, "distinct names"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"alpha": -1.0}, "alpha must be positive"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(pm.ConfigError, match=match):
        HyperLoRA(**kwargs)


def test_refuses_embeddings_and_input_sites():
    assert HyperLoRA(sites="attn.q").sites == "attn.q"
    model = pm.Modular(make_host("llama"))
    with pytest.raises(pm.IncompatibleHostError, match="not embeddings or blocks"):
        model.add("h", HyperLoRA(sites="embed"))
    with pytest.raises(pm.IncompatibleHostError, match="not embeddings or blocks"):
        model.add("h", HyperLoRA(sites="<input>"))
    # a package saved before 0.2 lists the hypernetwork's old '<input>' site: refused by name on load
    with pytest.raises(pm.FormatError, match="saved before polymod 0.2 kept the hypernetwork at '<input>'"):
        HyperLoRA().build_part(Site("<input>", "input", None, None), None)
