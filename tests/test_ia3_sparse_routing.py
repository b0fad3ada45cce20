"""IA³ and sparse modules in per-example batches: a routed batch equals running each row alone."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.modules.ia3 import IA3
from polymod.modules.sparse import SparseFT
from tests.hosts import FAMILIES, make_batch, make_host

SPECS = {"ia3": IA3(), "sparse": SparseFT(density=0.1, sites="attn.v|ffn.out")}


def _randomise(module: pm.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            base = 1.0 if module.kind == "ia3" else 0.0  # IA³ vectors live around 1
            p.copy_(base + 0.3 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", SPECS)
def test_routed_batch_equals_each_row_alone(kind, family):
    host = make_host(family)
    model = pm.Modular(host)
    for i, name in enumerate(("a", "b")):
        model.add(name, SPECS[kind])
        _randomise(model[name], i)
    batch = make_batch(family, batch=4)
    alone = {}
    for name in ("a", "b"):
        model.use(name)
        with torch.no_grad():
            alone[name] = host(**batch).logits
    model.use(None)
    with torch.no_grad():
        bare = host(**batch).logits
        with model.route(["a", "b", None, "a"]):
            routed = host(**batch).logits
    expected = torch.stack([alone["a"][0], alone["b"][1], bare[2], alone["a"][3]])
    torch.testing.assert_close(routed, expected, rtol=1e-4, atol=1e-6)
    assert (alone["a"] - alone["b"]).abs().max() > 2e-5, "the two modules must differ"  # tiny BERT logits are ~0.01
