"""Parity with PEFT's IA³ on identical weights, on every tiny host family.

Both libraries get the same host (same seed, biases made non-zero so bias
scaling is compared too), the same sites and the same random vectors l; the
logits must agree to 1e-5.
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


def ia3_parity(family: str) -> float:
    """Max |logits(polymod) − logits(PEFT)| for IA³ with random vectors on ``family``'s default sites."""
    ours, theirs = _host(family), _host(family)
    batch = make_batch(family)
    model = pm.Modular(ours)
    model.add("m", IA3())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model["m"].parameters():
            p.copy_(0.5 + torch.rand(p.shape, generator=g))
    model.use("m")
    module = model["m"]
    config = peft.IA3Config(
        target_modules=list(module.sites),
        feedforward_modules=[s for s, part in module.items() if part.scales_input],
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D stores W transposed
    )
    wrapped = peft.get_peft_model(theirs, config)
    with torch.no_grad():
        for site, part in module.items():
            target = wrapped.base_model.model.get_submodule(site).ia3_l["default"]
            target.copy_(part.scale.view(target.shape))
        a, b = ours(**batch).logits, wrapped(**batch).logits
    assert not torch.allclose(a, make_host(family, seed=7)(**batch).logits, atol=1e-3), "the vectors must act"
    return (a - b).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_matches_peft_on_identical_weights(family):
    assert ia3_parity(family) < 1e-5
