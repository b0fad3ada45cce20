"""PEFT's modules_to_save <-> polymod's head module, both directions, on the four tiny families (ISSUE 14.1, 17.5)."""

from __future__ import annotations

import copy

import pytest
import torch

import polymod as pm
from tests.hosts import logits, make_batch, make_host, randomize

peft = pytest.importorskip("peft")

# family, LoRA targets, layers PEFT keeps a trainable copy of, fan_in_fan_out, PEFT task type
CASES = [("bert", ["query", "value"], None, False, "SEQ_CLS"),  # SEQ_CLS adds the classifier itself
         ("gpt2", ["c_attn"], ["lm_head"], True, None),
         ("llama", ["q_proj", "down_proj"], ["lm_head"], False, None),
         ("t5", ["q", "wo"], ["lm_head"], False, None)]


@pytest.mark.parametrize("family,targets,heads,fan_in_fan_out,task", CASES)
def test_peft_adapter_with_modules_to_save_loads_as_lora_plus_head(tmp_path, family, targets, heads,
                                                                    fan_in_fan_out, task):
    host = make_host(family)
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=heads,
                          fan_in_fan_out=fan_in_fan_out, task_type=task)
    theirs = peft.get_peft_model(copy.deepcopy(host), cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    theirs.eval().save_pretrained(tmp_path / "peft")
    with pytest.raises(pm.FormatError, match=r"modules_to_save.*pm\.read_peft_modules"):
        pm.load(tmp_path / "peft", host=host)
    modules = pm.read_peft_modules(tmp_path / "peft", host=host)
    assert list(modules) == ["lora", "head"]
    assert sorted(modules["head"].sites) == (["classifier"] if family == "bert" else ["lm_head"])
    model = pm.Modular(host)
    for name, module in modules.items():
        model.add(name, module)
    model.use(pm.Stack(*modules))
    batch = make_batch(family)
    want = logits(theirs, batch)
    assert not torch.allclose(want, logits(make_host(family), batch), atol=1e-3)
    torch.testing.assert_close(logits(host, batch), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,targets,heads,fan_in_fan_out,task", CASES)
def test_lora_plus_head_written_as_peft_loads_in_peft_identically(tmp_path, family, targets, heads,
                                                                   fan_in_fan_out, task):
    host = make_host(family)
    model = pm.Modular(host)
    model.add("lora", pm.LoRA(rank=3, alpha=6, sites=[f"*.{t}" for t in targets]))
    model.add("head", pm.Head(sites="classifier" if family == "bert" else "lm_head"))
    randomize(model["lora"], 0.3)
    randomize(model["head"], 0.3)
    model.use(pm.Stack("lora", "head"))
    pm.write_peft(model["lora"], tmp_path / "out", head=model["head"])
    theirs = peft.PeftModel.from_pretrained(make_host(family), tmp_path / "out").eval()
    batch = make_batch(family)
    torch.testing.assert_close(logits(theirs, batch), logits(host, batch), rtol=0, atol=1e-5)
    back = pm.read_peft_modules(tmp_path / "out", host=make_host(family))["head"]
    for site, part in model["head"].items():
        assert torch.equal(back.part(site).weight, part.weight)


def test_ia3_with_modules_to_save_reads_its_head(tmp_path):
    host = make_host("llama")
    cfg = peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                         modules_to_save=["lm_head"])
    theirs = peft.get_peft_model(copy.deepcopy(host), cfg)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    theirs.eval().save_pretrained(tmp_path / "peft")
    modules = pm.read_peft_modules(tmp_path / "peft", host=host)
    model = pm.Modular(host)
    for name, module in modules.items():
        model.add(name, module)
    model.use(pm.Stack(*modules))
    batch = make_batch("llama")
    torch.testing.assert_close(logits(host, batch), logits(theirs, batch), rtol=0, atol=1e-5)


def test_heads_need_the_host_and_write_peft_takes_only_a_head(tmp_path):
    host = make_host("llama")
    cfg = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
    peft.get_peft_model(copy.deepcopy(host), cfg).save_pretrained(tmp_path / "peft")
    with pytest.raises(pm.ConfigError, match=r"modules_to_save \(\['lm_head'\]\) needs the host"):
        pm.read_peft_modules(tmp_path / "peft")
    model = pm.Modular(host)
    model.add("lora", pm.LoRA(rank=2))
    with pytest.raises(pm.ConfigError, match="head= takes a head module"):
        pm.write_peft(model["lora"], tmp_path / "out", head=model["lora"])


@pytest.mark.parametrize("cls", ["PromptTuningConfig"])  # PEFT's prefix tuning needs a cache BERT does not offer
def test_prompt_learning_with_a_trained_classifier_reads_its_head(tmp_path, cls):
    host = make_host("bert")
    theirs = peft.get_peft_model(copy.deepcopy(host), getattr(peft, cls)(task_type="SEQ_CLS", num_virtual_tokens=3))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:  # the prompt and PEFT's trainable copy of the classifier
                p.add_(torch.randn_like(p) * 0.3)
    theirs.eval().save_pretrained(tmp_path / "peft")
    with pytest.raises(pm.FormatError, match=r"modules_to_save.*pm\.read_peft_modules"):
        pm.load(tmp_path / "peft", host=host)
    modules = pm.read_peft_modules(tmp_path / "peft", host=host)
    assert sorted(modules) == ["head", "prefix" if cls.startswith("Prefix") else "prompt"]
    model = pm.Modular(host)
    for name, module in modules.items():
        model.add(name, module)
    model.use(pm.Stack(*modules))
    batch = make_batch("bert")
    torch.testing.assert_close(logits(host, batch), logits(theirs, batch), rtol=0, atol=1e-5)
