"""PiSSA / OLoRA adapters saved the default way, and aLoRA: refused with the reason and the fix (ISSUE 17).

PEFT rebuilds a residual host (W − s·B₀A₀) when it loads a PiSSA/OLoRA adapter saved without conversion, and
an aLoRA acts only after its invocation tokens; polymod adding B A to the original weights would be silently
wrong (0.52 and 1.04 off on SmolLM2). Converted on save, PiSSA/OLoRA become plain LoRAs that polymod reads
exactly.
"""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from tests.hosts import logits, make_batch, make_host

peft = pytest.importorskip("peft")


def _trained(model) -> None:
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_unconverted_residual_init_is_refused_with_the_conversion_to_use(tmp_path, init):
    model = peft.get_peft_model(make_host("llama"), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init))
    model.eval().save_pretrained(tmp_path / "plain")
    theirs = peft.PeftModel.from_pretrained(make_host("llama"), tmp_path / "plain").eval()
    batch = make_batch("llama")
    # untrained: PEFT's output is the bare host's, while B A ≠ 0 on the original weights would change it
    torch.testing.assert_close(logits(theirs, batch), logits(make_host("llama"), batch), rtol=0, atol=1e-4)
    with pytest.raises(pm.FormatError, match=rf"init_lora_weights='{init}'.*path_initial_model_for_weight_conversion"):
        pm.load(tmp_path / "plain", host=make_host("llama"))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_converted_on_save_loads_exactly(tmp_path, init):
    model = peft.get_peft_model(make_host("llama"), peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=init))
    model.save_pretrained(tmp_path / "initial")
    _trained(model)
    model.eval().save_pretrained(tmp_path / "converted",
                                 path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    host, batch = make_host("llama"), make_batch("llama")
    theirs = peft.PeftModel.from_pretrained(make_host("llama"), tmp_path / "converted").eval()
    ours = pm.Modular(host)
    ours.add("p", pm.load(tmp_path / "converted", host=host))
    ours.use("p")
    want = logits(theirs, batch)
    assert (want - logits(make_host("llama"), batch)).abs().max() > 1e-3, "the trained adapter must act"
    assert ours["p"].spec.rank == 8, "the conversion writes rank 2r"
    torch.testing.assert_close(logits(host, batch), want, rtol=0, atol=1e-5)


def test_alora_is_refused_with_the_reason(tmp_path):
    cfg = peft.LoraConfig(r=4, task_type="CAUSAL_LM", alora_invocation_tokens=[5, 6])
    peft.get_peft_model(make_host("llama"), cfg).save_pretrained(tmp_path / "a")
    with pytest.raises(pm.FormatError, match=r"alora_invocation_tokens=\[5, 6\].*after its invocation.*every token"):
        pm.load(tmp_path / "a", host=make_host("llama"))
