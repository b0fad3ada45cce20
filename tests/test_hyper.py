"""Hypernetwork LoRA: live == materialised, per-row selection, new tasks, save/load and errors."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.modules import hyper
from polymod.modules.hyper import HyperLoRA
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
def test_materialised_lora_equals_the_live_module_and_merges(family):
    host, model = _attach(family)
    batch = make_batch(family)
    hyper.select(model["hx"], "mnli", "de")
    live = host(**batch).logits
    lora = hyper.materialise(model["hx"], task="mnli", language="de")
    assert lora.kind == "lora" and "<input>" not in lora.sites and lora.mergeable
    assert lora.card.lineage.recipe == {"method": "materialise", "task": "mnli", "language": "de"}
    assert hyper.selection(model["hx"]) == ("mnli", "de"), "materialise leaves the selection as it was"
    model.add("mnli-de", lora)
    model.use("mnli-de")
    torch.testing.assert_close(host(**batch).logits, live, rtol=1e-5, atol=1e-6)
    if family == "llama":  # GPT-2 ties no attention weights either, but one merge check suffices
        model.merge_into_host("mnli-de")
        torch.testing.assert_close(host(**batch).logits, live, rtol=1e-4, atol=1e-5)
    model.use("hx")
    hyper.select(model["hx"], "sst2", "en")
    assert not torch.allclose(host(**batch).logits, live, atol=1e-4), "another task generates other weights"


def test_per_row_selection_equals_each_row_alone():
    host, model = _attach()
    batch = make_batch("llama")
    rows = [("sst2", "en"), ("mnli", "de"), ("sst2", "de")]
    hyper.select(model["hx"], [t for t, _ in rows], [g for _, g in rows])
    together = host(**batch).logits
    for i, (task, language) in enumerate(rows):
        with hyper.selected(model["hx"], task, language):
            alone = host(**{k: v[i:i + 1] for k, v in batch.items()}).logits
        torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    assert hyper.selection(model["hx"])[0] == ["sst2", "mnli", "sst2"], "selected() restores the selection"
    with pytest.raises(pm.StateError, match="per-row selection has 3 rows"):
        host(**make_batch("llama", batch=2))


def test_heads_are_shared_by_sites_of_one_shape():
    _, model = _attach()
    hub = model["hx"].part("<input>")
    assert sorted(hub.heads) == ["32x16", "32x32", "32x48"]  # q (32->32), v (GQA: 32->16), ffn.in (32->48)
    trunk = hub.trunk.weight.numel() + hub.trunk.bias.numel()
    heads = sum(p.numel() for p in hub.heads.parameters())
    sites = (len(model["hx"].sites) - 1) * 6
    assert model["hx"].num_parameters() == trunk + heads + sites + 4 * 6  # + 2 task and 2 language embeddings


def test_new_task_is_a_new_embedding_and_survives_save_load(tmp_path):
    host, model = _attach()
    batch = make_batch("llama")
    hyper.add_task(model["hx"], "qnli")
    assert model["hx"].spec.tasks == ("sst2", "mnli", "qnli") and model["hx"].card.config["tasks"][-1] == "qnli"
    hub = model["hx"].part("<input>")
    torch.testing.assert_close(hub.task_embeddings[2], hub.task_embeddings[:2].mean(0))
    with torch.no_grad():
        hub.task_embeddings[2] += 0.5
    hyper.select(model["hx"], "qnli", "de")
    expected = host(**batch).logits
    pm.save(model["hx"], tmp_path / "hx")
    loaded = pm.load(tmp_path / "hx")
    model.use(None)
    model.add("again", loaded)
    hyper.select(loaded, "qnli", "de")
    model.use("again")
    torch.testing.assert_close(host(**batch).logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(pm.ConfigError, match="distinct names"):
        hyper.add_task(model["again"], "qnli")


def test_selection_errors():
    _, model = _attach()
    with pytest.raises(pm.ConfigError, match="unknown task 'cola'.*add_task"):
        hyper.select(model["hx"], "cola")
    with pytest.raises(pm.ConfigError, match="one entry per row: 2 tasks, 3 languages"):
        hyper.select(model["hx"], ["sst2", "mnli"], ["en", "de", "en"])
    bare = pm.Modular(make_host("llama"))
    bare.add("h", HyperLoRA(rank=2))
    with pytest.raises(pm.ConfigError, match="has no languages"):
        hyper.select(bare["h"], "default", "en")
    with pytest.raises(pm.ConfigError, match="made without languages"):
        hyper.add_language(bare["h"], "en")
    bare.add("l", pm.LoRA(rank=2))
    with pytest.raises(pm.ConfigError, match="expected a hyper-lora module"):
        hyper.select(bare["l"], "default")


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


def test_refuses_embeddings_and_adds_its_hub_site():
    assert HyperLoRA(sites="attn.q").sites == "<input>|attn.q"
    model = pm.Modular(make_host("llama"))
    with pytest.raises(pm.IncompatibleHostError, match="not embeddings or blocks"):
        model.add("h", HyperLoRA(sites="embed"))
