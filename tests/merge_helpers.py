"""Helpers shared by the merging tests: hand-made delta modules, and one intra-op thread.

The merging tests run many tiny tensor operations; on a busy machine PyTorch's
intra-op threads only add a barrier to each (the 2-layer test hosts run 10-50×
slower with 2 threads than with 1), so these tests use one thread.
"""

from __future__ import annotations

import pytest
import torch

from polymod.modules.contract import Module
from polymod.modules.delta import Delta
from polymod.sites import Site


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def delta_module(tensors: dict[str, list[list[float]]], name: str | None = None) -> Module:
    """A dense delta module with hand-made ΔW at made-up linear sites (rows = D_out)."""
    sites = [Site(s, "linear", len(t[0]), len(t)) for s, t in tensors.items()]
    spec = Delta(sites="|".join(tensors))
    parts = [spec.build_part(s, None) for s in sites]
    with torch.no_grad():
        for p, t in zip(parts, tensors.values()):
            p.weight.copy_(torch.tensor(t))
    module = Module(spec, sites, parts)
    module.card.name = name
    return module
