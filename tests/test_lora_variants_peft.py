"""LoRA variants from PEFT configs, both directions, on the four tiny families (ISSUE 17.5): DoRA (use_dora),
rank_pattern / alpha_pattern, bias="lora_only", layers_pattern; pm.load of a PEFT dir and pm.write_peft -> PEFT
each equal PEFT within 1e-5."""

from __future__ import annotations

import copy

import pytest
import torch

import polymod as pm
from tests.hosts import logits, make_batch, make_host, randomize

peft = pytest.importorskip("peft")

TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "down_proj"],
           "t5": ["q", "wo"]}
HAS_BIAS = ("bert", "gpt2")


def _variants(family):
    first, second = TARGETS[family]
    out = {"dora": {"use_dora": True},
           "patterns": {"rank_pattern": {second: 2}, "alpha_pattern": {first: 3}},
           "dora+patterns": {"use_dora": True, "rank_pattern": {first: 6}, "alpha_pattern": {second: 5}}}
    if family in HAS_BIAS:
        out["bias"] = {"bias": "lora_only"}
        out["bias+dora"] = {"bias": "lora_only", "use_dora": True}
    if family == "llama":
        out["layers_pattern"] = {"layers_pattern": "layers", "layers_to_transform": [1], "use_dora": True}
    return out


CASES = [(f, v) for f in TARGETS for v in _variants(f)]


@pytest.mark.parametrize("family,variant", CASES)
def test_peft_variant_loads_equal_to_peft(tmp_path, family, variant):
    host = make_host(family)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2",
                          **_variants(family)[variant])
    theirs = peft.get_peft_model(copy.deepcopy(host), cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    theirs.eval().save_pretrained(tmp_path / "peft")
    module = pm.load(tmp_path / "peft", host=host)
    model = pm.Modular(host)
    model.add("m", module)
    model.use("m")
    batch = make_batch(family)
    want = logits(theirs, batch)
    assert not torch.allclose(want, logits(make_host(family), batch), atol=1e-4), "the adapter must act"
    torch.testing.assert_close(logits(host, batch), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,variant", CASES)
def test_polymod_variant_written_as_peft_loads_equal_in_peft(tmp_path, family, variant):
    options = _variants(family)[variant]
    if "layers_pattern" in options:
        pytest.skip("layers_pattern selects sites; polymod writes the selected sites by name")
    host = make_host(family)
    model = pm.Modular(host)
    spec = pm.LoRA(rank=4, alpha=8, sites=[f"*.{t}" for t in TARGETS[family]], dora=options.get("use_dora", False),
                   bias=options.get("bias") == "lora_only", rank_pattern=options.get("rank_pattern", {}),
                   alpha_pattern=options.get("alpha_pattern", {}))
    model.add("m", spec)
    randomize(model["m"], 0.3)
    model.use("m")
    pm.write_peft(model["m"], tmp_path / "out", host=host)
    theirs = peft.PeftModel.from_pretrained(make_host(family), tmp_path / "out").eval()
    batch = make_batch(family)
    torch.testing.assert_close(logits(theirs, batch), logits(host, batch), rtol=0, atol=1e-5)
    back = pm.load(tmp_path / "out", host=make_host(family))
    for site, part in model["m"].items():
        for key, value in part.state_dict().items():
            torch.testing.assert_close(back.part(site).state_dict()[key], value, rtol=0, atol=1e-6)


def test_bias_all_and_dora_on_embeddings_are_refused_by_name(tmp_path):
    host = make_host("bert")
    cfg = peft.LoraConfig(r=2, target_modules=["query"], bias="all")
    peft.get_peft_model(copy.deepcopy(host), cfg).save_pretrained(tmp_path / "all")
    with pytest.raises(pm.FormatError, match=r"bias='all'.*'all' also trains the biases of layers"):
        pm.load(tmp_path / "all", host=host)
    cfg = peft.LoraConfig(r=2, target_modules=["word_embeddings"], use_dora=True)
    peft.get_peft_model(copy.deepcopy(host), cfg).save_pretrained(tmp_path / "emb")
    with pytest.raises(pm.FormatError, match=r"DoRA rescales linear layers.*not a embedding"):
        pm.load(tmp_path / "emb", host=host)
    with pytest.raises(pm.IncompatibleHostError, match="DoRA rescales linear layers"):
        pm.Modular(host).add("m", pm.LoRA(dora=True, sites="embed"))
    with pytest.raises(pm.IncompatibleHostError, match=r"LoRA\(bias=True\) trains the bias of .*which has none"):
        pm.Modular(make_host("llama")).add("m", pm.LoRA(bias=True, sites="attn.q"))


def test_dora_and_bias_loras_merge_through_their_weight_delta():
    host = make_host("gpt2")
    model = pm.Modular(host)
    for name in ("a", "b"):
        model.add(name, pm.LoRA(rank=2, dora=True, bias=True, sites="attn.q|ffn.out"))
        randomize(model[name], 0.1)
        with torch.no_grad():
            for part in model[name].parts.values():
                part.magnitude.add_(1.0)
    batch = make_batch("gpt2")
    merged = pm.merge({"a": model["a"], "b": model["b"]}, method="linear", weights=[0.5, 0.5])
    assert merged.kind == "delta" and merged.card.lineage.recipe.get("lora") is None
    model.add("ab", merged)
    model.use("ab")
    out = logits(host, batch)
    model.use(pm.Mix(["a", "b"], router=pm.Static([0.5, 0.5]), aggregate="delta"))
    torch.testing.assert_close(out, logits(host, batch), rtol=1e-4, atol=1e-5)  # the same Σ w ΔW, Σ w Δb
    with pytest.raises(pm.ConfigError, match=r"lora='cat' combines LoRA factors, which misses DoRA's magnitude"):
        pm.merge({"a": model["a"], "b": model["b"]}, lora="cat")
