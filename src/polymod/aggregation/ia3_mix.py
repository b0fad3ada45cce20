"""Batched IA³ mixing: many IA³ vectors at one site in one elementwise product.

IA³'s contribution is linear in its vector l: Δyᵢ = (lᵢ − 1) ⊙ y at an output
site, W((lᵢ − 1) ⊙ x) at an input-scaling site. A weighted sum of modules is
therefore one mixed vector, s = Σᵢ wᵢ (lᵢ − 1)::

    output scaling:  y' = y ⊙ (1 + s)
    input scaling:   y' = y + W (s ⊙ x)        (one GEMM, as a single module)

With one module per row (row groups) s is gathered per row from the stacked
vectors (E+1, D) — slot E zero for host-only rows; with dense weights it is a
(…, E) × (E, D) product. Exact, not an approximation: no loop over modules.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from polymod.aggregation.cache import StackCache
from polymod.aggregation.weighted import Weights, expand
from polymod.modules.ia3 import IA3Part
from polymod.routing.groups import RowGroups


def _scales(parts: Sequence[IA3Part], key: Hashable, cache: StackCache, like: torch.Tensor) -> torch.Tensor:
    """(l − 1) of every part, stacked (E+1, D), the last row zero."""

    def build() -> torch.Tensor:
        s = torch.stack([p.scale - 1 for p in parts])  # (E, D)
        return torch.cat([s, torch.zeros_like(s[:1])])  # (E+1, D)

    return cache.get((key, "ia3"), lambda: [p.scale for p in parts], build, like)


def ia3_mixer(parts: Sequence[IA3Part], x: torch.Tensor, y: torch.Tensor, w: Weights, key: Hashable,
              cache: StackCache) -> torch.Tensor | None:
    """y' for IA³ parts that all scale outputs or all scale inputs (None: use the generic mixer)."""
    input_scaling = cache.meta((key, "ia3-kind"), lambda: {p.scales_input for p in parts})
    if len(input_scaling) != 1:
        return None
    if isinstance(w, RowGroups) and w.single is not None:
        return parts[w.single].add_into(x, y)
    stacked = _scales(parts, key, cache, y)  # (E+1, D)
    if isinstance(w, RowGroups):
        s = stacked.index_select(0, w.padded_index())  # (B, D)
        s = s.view(s.shape[0], *([1] * (y.dim() - 2)), s.shape[-1])  # (B, 1, …, D)
    else:
        we = expand(w.to(stacked.dtype), y)  # (…, E)
        s = we @ stacked[:-1]  # (…, D)
    if next(iter(input_scaling)):
        return parts[0]._scaled_input_product(x, s, y)  # y + W(s ⊙ x), one fused GEMM
    return y * (1 + s)  # (B, T, D_out)

