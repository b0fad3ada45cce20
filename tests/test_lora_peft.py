"""Parity with PEFT's LoRA on identical weights (an independent implementation)."""

from __future__ import annotations

import copy

import pytest
import torch

import polymod as pm
from tests.hosts import logits, make_batch, make_host, randomize

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"]),
                                            ("bert", ["query", "value"]), ("t5", ["q", "v", "wo"])])
@pytest.mark.parametrize("rslora", [False, True])
def test_outputs_match_peft(family, targets, rslora):
    host = make_host(family)
    twin_host = copy.deepcopy(host)
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=4, alpha=8, rslora=rslora, sites=[f"*.{t}" for t in targets]))
    randomize(model["a"], 0.3)
    model.use("a")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=rslora, target_modules=targets, lora_dropout=0.0,
                          fan_in_fan_out=family == "gpt2")
    twin = peft.get_peft_model(twin_host, cfg).eval()
    layers = dict(twin.named_modules())
    with torch.no_grad():
        for site, part in model["a"].items():
            layer = layers[f"base_model.model.{site}"]
            layer.lora_A["default"].weight.copy_(part.A)
            layer.lora_B["default"].weight.copy_(part.B)
    batch = make_batch(family)
    ours, theirs = logits(host, batch), logits(twin, batch)
    model.use(None)
    assert (ours - logits(host, batch)).abs().max() > 1e-4, "the module must matter for the parity to mean anything"
    model.use("a")
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    with torch.no_grad():
        twin.merge_adapter()
    model.merge_into_host("a")
    torch.testing.assert_close(logits(host, batch), logits(twin, batch), rtol=0, atol=1e-5)
