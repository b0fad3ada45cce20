"""PEFT interop: PEFT directories load as polymod modules, and polymod modules save as PEFT directories
that ``peft`` itself loads with identical outputs."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import polymod as pm
from polymod.interop import detect, read_peft, write_peft
from polymod.modules.ia3 import IA3
from tests.hosts import logits, make_batch, make_host, randomize

peft = pytest.importorskip("peft")

LORA_CASES = [("bert", ["query", "value"], False), ("gpt2", ["c_attn"], True),
              ("llama", ["q_proj", "down_proj"], False), ("t5", ["q", "wo"], False),
              ("llama", ["embed_tokens", "v_proj"], False)]


def _peft_lora_dir(tmp_path, family, targets, fan_in_fan_out, rslora=False):
    host = make_host(family)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                          fan_in_fan_out=fan_in_fan_out)
    model = peft.get_peft_model(copy.deepcopy(host), cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path / "peft")
    return host, model


@pytest.mark.parametrize("family,targets,fan_in_fan_out", LORA_CASES)
def test_peft_lora_dir_loads_with_identical_outputs(tmp_path, family, targets, fan_in_fan_out):
    host, theirs = _peft_lora_dir(tmp_path, family, targets, fan_in_fan_out, rslora=family == "t5")
    assert detect(tmp_path / "peft") == "peft"
    module = pm.load(tmp_path / "peft")  # format detected
    assert module.kind == "lora" and module.card.lineage.recipe["format"] == "peft"
    model = pm.Modular(host)
    model.add("p", module)
    model.use("p")
    batch = make_batch(family)
    expected = logits(theirs, batch)
    assert not torch.allclose(expected, logits(make_host(family), batch), atol=1e-4), "the adapter must act"
    torch.testing.assert_close(logits(host, batch), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,targets,fan_in_fan_out", LORA_CASES[:3])
def test_polymod_lora_written_as_peft_loads_in_peft_identically(tmp_path, family, targets, fan_in_fan_out):
    host = make_host(family)
    model = pm.Modular(host)
    model.add("m", pm.LoRA(rank=3, alpha=6, rslora=True, sites=[f"*.{t}" for t in targets]))
    randomize(model["m"], 0.3)
    model.use("m")
    write_peft(model["m"], tmp_path / "out")
    theirs = peft.PeftModel.from_pretrained(make_host(family), tmp_path / "out").eval()
    batch = make_batch(family)
    torch.testing.assert_close(logits(theirs, batch), logits(host, batch), rtol=0, atol=1e-5)
    back = read_peft(tmp_path / "out")  # and back again, bit for bit
    for site, part in model["m"].items():
        assert torch.equal(back.part(site).A, part.A) and torch.equal(back.part(site).B, part.B)
    assert back.spec.scaling == model["m"].spec.scaling


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_ia3_round_trip_through_peft(tmp_path, family):
    host = make_host(family)
    model = pm.Modular(host)
    model.add("m", IA3())
    with torch.no_grad():
        for p in model["m"].parameters():
            p.uniform_(0.5, 1.5)
    model.use("m")
    batch = make_batch(family)
    write_peft(model["m"], tmp_path / "out")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    # The FFN is scaled at an input (PEFT's feedforward modules) except on gated FFNs, where polymod scales
    # up_proj's output instead (the same function): there PEFT gets up_proj as an output-scaled target.
    ffn = {"bert": "dense", "gpt2": "c_proj", "llama": "up_proj"}[family]
    assert any(t.endswith(ffn) for t in config["target_modules"])
    assert bool(config["feedforward_modules"]) == (family != "llama")
    theirs = peft.PeftModel.from_pretrained(make_host(family), tmp_path / "out").eval()
    torch.testing.assert_close(logits(theirs, batch), logits(host, batch), rtol=0, atol=1e-5)
    with pytest.raises(pm.ConfigError, match="needs the host"):
        pm.load(tmp_path / "out")
    other = make_host(family)
    again = pm.Modular(other)
    again.add("m", pm.load(tmp_path / "out", host=other))
    again.use("m")
    torch.testing.assert_close(logits(other, batch), logits(host, batch), rtol=0, atol=1e-6)


def test_pickle_only_and_unsupported_peft_dirs_are_refused(tmp_path):
    host, _ = _peft_lora_dir(tmp_path, "bert", ["query"], False)
    d = tmp_path / "peft"
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")
    with pytest.raises(pm.FormatError, match="pickle.*safe_serialization=True"):
        pm.load(d)
    config = json.loads((d / "adapter_config.json").read_text())
    (d / "adapter_model.bin").rename(d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(pm.FormatError, match="use_dora"):
        pm.load(d)
    (d / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with pytest.raises(pm.FormatError, match="LOHA.*not supported"):
        pm.load(d)
    with pytest.raises(pm.FormatError, match="not a module polymod can read"):
        pm.load(tmp_path)


def test_peft_import_pushes_to_hub_and_keeps_fingerprint(tmp_path):
    from polymod import hub

    host, theirs = _peft_lora_dir(tmp_path, "bert", ["query", "value"], False)
    module = read_peft(tmp_path / "peft", host=host)
    assert module.card.host["architecture"] == "BertForSequenceClassification"
    pm.save(module, tmp_path / "pkg")
    hub.push(tmp_path / "pkg", "alice/from-peft@1.0.0", hub=tmp_path / "store")
    loaded = hub.get("alice/from-peft", host=host, hub=tmp_path / "store")
    model = pm.Modular(host)
    model.add("p", loaded)
    model.use("p")
    batch = make_batch("bert")
    torch.testing.assert_close(logits(host, batch), logits(theirs, batch), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_prompt_tuning_round_trip_through_peft(tmp_path, family):
    from polymod.modules.prompt import PromptTuning

    task = "SEQ_CLS" if family == "bert" else "CAUSAL_LM"
    theirs = peft.get_peft_model(make_host(family), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=4))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.normal_(0, 0.5)
    theirs.eval().save_pretrained(tmp_path / "peft")
    host, batch = make_host(family), make_batch(family)
    with pytest.raises(pm.ConfigError, match="needs the host"):
        pm.load(tmp_path / "peft")
    model = pm.Modular(host)
    model.add("p", pm.load(tmp_path / "peft", host=host))
    model.use("p")
    with torch.no_grad():
        want = theirs(**batch).logits
    torch.testing.assert_close(logits(host, batch), want, rtol=0, atol=1e-5)
    assert isinstance(model["p"].spec, PromptTuning)
    write_peft(model["p"], tmp_path / "back", host=host)  # polymod -> PEFT -> peft loads it, same outputs
    again = peft.PeftModel.from_pretrained(make_host(family), tmp_path / "back").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,projection", [("gpt2", False), ("gpt2", True), ("llama", False)])
def test_prefix_tuning_peft_dir_loads_with_identical_outputs(tmp_path, family, projection):
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3, prefix_projection=projection,
                                  encoder_hidden_size=8)
    theirs = peft.get_peft_model(make_host(family), cfg)
    with torch.no_grad():
        for p in theirs.prompt_encoder["default"].parameters():
            p.normal_(0, 0.5)
    theirs.eval().save_pretrained(tmp_path / "peft")
    host, batch = make_host(family), make_batch(family)
    model = pm.Modular(host)
    model.add("p", pm.load(tmp_path / "peft", host=host))
    model.use("p")
    with torch.no_grad():
        want = theirs(**batch).logits
    assert not torch.allclose(want, logits(make_host(family), batch), atol=1e-4)
    torch.testing.assert_close(logits(host, batch), want, rtol=0, atol=1e-5)
