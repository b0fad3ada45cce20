"""Precision (ISSUE 17.6): a host cast after attaching (host.half(), host.to(torch.bfloat16)) keeps working for every
kind; modules keep float32 parameters on half-precision hosts (as PEFT's autocast_adapter_dtype) and compute their
contribution in float32; on a bf16 host polymod's error against float32 is no worse than PEFT's."""

from __future__ import annotations

import copy

import pytest
import torch

import polymod as pm
from tests.hosts import FAMILIES, logits, make_batch, make_host, randomize
from tests.kinds import KINDS

CASES = [(k, f) for k in KINDS for f in FAMILIES]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,family", CASES)
def test_host_cast_after_attach_runs_and_stays_close(kind, family, dtype):
    spec = KINDS[kind][0](family)
    if spec is None:
        pytest.skip(f"{kind} does not apply to {family}")
    host = make_host(family)
    model = pm.Modular(host)
    model.add("m", spec)
    randomize(model["m"], 0.05)
    model.use("m")
    batch = make_batch(family)
    want = logits(host, batch)
    host.to(dtype)
    got = logits(host, batch)
    assert got.dtype == dtype and all(p.dtype == torch.float32 for p in model["m"].parameters())
    scale = float(want.abs().max())
    assert float((got.float() - want).abs().max()) <= 0.05 * scale + 0.02, "half precision drifted too far"


def test_modules_on_a_half_precision_host_keep_float32_parameters(tmp_path):
    host = make_host("llama").to(torch.bfloat16)
    model = pm.Modular(host)
    model.add("lora", pm.LoRA(rank=2, sites="linear"))
    model.add("head", pm.Head(sites="lm_head"))
    assert {p.dtype for n in ("lora", "head") for p in model[n].parameters()} == {torch.float32}
    torch.testing.assert_close(model["head"].part("lm_head").weight, host.lm_head.weight.float(), rtol=0, atol=0)
    pm.save(model["lora"], tmp_path / "lora")
    again = pm.Modular(make_host("llama").to(torch.bfloat16))
    again.add("lora", pm.load(tmp_path / "lora"))
    assert {p.dtype for p in again["lora"].parameters()} == {torch.float32}


def _bf16_errors(peft, family: str, targets: list[str]) -> tuple[float, float]:
    """max |logits(bf16 host) − logits(float32)| for polymod and PEFT, with the same LoRA weights."""
    base = make_host(family)
    cfg = peft.LoraConfig(r=16, lora_alpha=32, target_modules=targets, fan_in_fan_out=family == "gpt2")
    ref = peft.get_peft_model(copy.deepcopy(base), cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in ref.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    batch = make_batch(family)
    want = logits(ref.eval(), batch)
    state = {k: v for k, v in ref.state_dict().items() if "lora_" in k}
    theirs = peft.get_peft_model(copy.deepcopy(base).to(torch.bfloat16), cfg)  # autocast_adapter_dtype: float32
    theirs.load_state_dict(state, strict=False)
    peft_err = float((logits(theirs.eval(), batch).float() - want).abs().max())
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(tmp)
        module = pm.load(tmp)
    host = copy.deepcopy(base).to(torch.bfloat16)
    model = pm.Modular(host)
    model.add("m", module)
    model.use("m")
    ours_err = float((logits(host, batch).float() - want).abs().max())
    return ours_err, peft_err


@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]),
                                            ("gpt2", ["c_attn", "c_fc", "c_proj"]), ("bert", ["query", "value"])])
def test_bf16_error_is_no_worse_than_peft(family, targets):
    peft = pytest.importorskip("peft")
    ours, theirs = _bf16_errors(peft, family, targets)
    print(f"\n{family}: max |bf16 - fp32| polymod {ours:.4g}, PEFT {theirs:.4g}")
    assert ours <= theirs * 1.05 + 1e-6, f"polymod {ours} vs PEFT {theirs}"
