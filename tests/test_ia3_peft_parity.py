"""Parity with PEFT's IA³ on identical weights, on every tiny host family.

Both libraries get the same host (same seed, biases made non-zero so bias
scaling is compared too), PEFT's default sites and the same random vectors l;
the logits must agree to 1e-5.
"""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.modules.ia3 import IA3
from tests.hosts import FAMILIES, make_batch, make_host

peft = pytest.importorskip("peft")


def _host(family: str) -> torch.nn.Module:
    host = make_host(family, seed=7)
    with torch.no_grad():
        g = torch.Generator().manual_seed(11)
        for name, p in host.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return host


# polymod's default places a gated FFN's vector at the up projection's output; PEFT's default at the
# output projection's input. The same vector, the same function (see polymod.modules.ia3).
_UP_TO_OUT = {".mlp.up_proj": ".mlp.down_proj", ".DenseReluDense.wi_1": ".DenseReluDense.wo"}


def _peft_site(site: str) -> tuple[str, bool]:
    """PEFT's (site, is_feedforward) for one of polymod's default sites scaled at its output."""
    for up, out in _UP_TO_OUT.items():
        if site.endswith(up):
            return site[: -len(up)] + out, True
    return site, False


def ia3_parity(family: str, gated_ffn: str = "up") -> float:
    """Max |logits(polymod) − logits(PEFT)| for IA³ with random vectors, PEFT at its default placement."""
    ours, theirs = _host(family), _host(family)
    batch = make_batch(family)
    model = pm.Modular(ours)
    model.add("m", IA3(gated_ffn=gated_ffn))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model["m"].parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
    model.use("m")
    placement = {site: _peft_site(site) if not part.scales_input else (site, True)
                 for site, part in model["m"].items()}
    config = peft.IA3Config(
        target_modules=[s for s, _ in placement.values()],
        feedforward_modules=[s for s, ff in placement.values() if ff],
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores W transposed
    )
    wrapped = peft.get_peft_model(theirs, config)
    with torch.no_grad():
        for site, part in model["m"].items():
            target = wrapped.base_model.model.get_submodule(placement[site][0]).ia3_l["default"]
            target.copy_(part.scale.view(target.shape))
        a, b = ours(**batch).logits, wrapped(**batch).logits
    assert not torch.allclose(a, make_host(family, seed=7)(**batch).logits, atol=1e-3), "the vectors must act"
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_matches_peft_on_identical_weights(family):
    assert ia3_parity(family) < 1e-5


def test_ia3_down_placement_matches_peft_on_llama():
    assert ia3_parity("llama", gated_ffn="down") < 1e-5
