"""The one-module format: module.json + weights.safetensors, fingerprints and loading checks."""

from __future__ import annotations

import json
import pickle
import warnings

import pytest
import torch

import polymod as pm
from tests.hosts import make_host, randomize


def _saved(tmp_path, family="llama", sites="attn.q|attn.v"):
    model = pm.Modular(make_host(family))
    model.add("a", pm.LoRA(rank=2, sites=sites))
    randomize(model["a"])
    return pm.save(model["a"], tmp_path / "a"), model


def test_layout_and_card(tmp_path):
    path, model = _saved(tmp_path)
    assert sorted(p.name for p in path.iterdir()) == ["module.json", "weights.safetensors"]
    card = json.loads((path / "module.json").read_text())
    assert card["format_version"] == 1 and card["kind"] == "lora" and card["config"]["rank"] == 2
    assert card["host"]["architecture"] == "LlamaForCausalLM"
    site = card["host"]["sites"]["model.layers.0.self_attn.q_proj"]
    assert site["weight"]["shape"] == [32, 32] and len(site["weight"]["sha256"]) == 64
    loaded = pm.load(path)
    for (s1, p1), (s2, p2) in zip(model["a"].items(), loaded.items()):
        assert s1 == s2 and torch.equal(p1.A, p2.A) and torch.equal(p1.B, p2.B)


def test_shape_mismatch_names_site_and_shapes(tmp_path):
    path, _ = _saved(tmp_path)
    import transformers as tf

    other = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=48, vocab_size=96))
    with pytest.raises(pm.IncompatibleHostError, match=r"model.layers.0.self_attn.q_proj.*32->32.*48->48"):
        pm.Modular(other).add("a", pm.load(path))
    with pytest.raises(pm.IncompatibleHostError, match="sites are missing from the host"):
        pm.Modular(make_host("gpt2")).add("a", pm.load(path))


def test_different_weights_same_shapes_warns(tmp_path):
    path, _ = _saved(tmp_path)
    with pytest.warns(pm.HostMismatchWarning, match="differ at .* from those the module was made on") as caught:
        pm.Modular(make_host("llama", seed=5)).add("a", pm.load(path))
    assert caught[0].filename == __file__, "the warning points at the user's own line, not polymod's internals"
    with pytest.warns(pm.HostMismatchWarning) as caught:
        pm.load(path, host=make_host("llama", seed=5))
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.Modular(make_host("llama")).add("a", pm.load(path))  # same host: silent


def test_rejects_pickle_and_damaged_files(tmp_path):
    path, _ = _saved(tmp_path)
    weights = path / "weights.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(pickle.dumps({"A": [1, 2, 3]}))
    with pytest.raises(pm.FormatError, match="not a readable safetensors file"):
        pm.load(path)
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(pm.FormatError, match="not a readable safetensors file"):
        pm.load(path)
    weights.write_bytes(good)
    card = json.loads((path / "module.json").read_text())
    card["config"]["rank"] = 3
    (path / "module.json").write_text(json.dumps(card))
    with pytest.raises(pm.FormatError, match=r"has shape \(2, 32\), the card's config implies \(3, 32\)"):
        pm.load(path)
    card["format_version"] = 99
    (path / "module.json").write_text(json.dumps(card))
    with pytest.raises(pm.FormatError, match="format_version 99 is not supported"):
        pm.load(path)
    (path / "module.json").write_text("{not json")
    with pytest.raises(pm.FormatError, match="not valid JSON"):
        pm.load(path)
    with pytest.raises(pm.FormatError, match="module.json is missing"):
        pm.load(tmp_path / "nowhere")


def test_save_replaces_atomically(tmp_path):
    path, model = _saved(tmp_path)
    with torch.no_grad():
        model["a"].part("model.layers.0.self_attn.q_proj").B.add_(1.0)
    pm.save(model["a"], path)
    reloaded = pm.load(path).part("model.layers.0.self_attn.q_proj").B
    assert torch.equal(reloaded, model["a"].part("model.layers.0.self_attn.q_proj").B)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"], "no temporary or backup folders left behind"
