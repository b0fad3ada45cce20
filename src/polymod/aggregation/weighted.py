"""Weighted sums of module contributions: the arithmetic of representation aggregation.

The survey's representation-level aggregation (§5.2) combines the active
modules' contributions Δyᵢ at a site as y' = y + Σᵢ wᵢ Δyᵢ. Weights come as one of

* a :class:`~polymod.routing.groups.RowGroups` — each row uses at most one
  candidate (per-example routing); or
* a dense tensor over the E candidates: (R, E) per task/row (R = 1 or B), or
  ``y.shape[:-1] + (E,)`` per token.

:func:`generic_mix` is the fallback for any kind: a loop over the active
candidates (E), never over rows — with row groups each candidate runs once on
its rows (index_select → part → index_copy), with dense weights each candidate
runs on the whole batch and is scaled by its weight. Kinds with a batched
formulation register a mixer in :mod:`polymod.aggregation.mixers`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from polymod.errors import StateError
from polymod.routing.groups import RowGroups

Weights = torch.Tensor | RowGroups


def expand(w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Shape weights to broadcast against ``y``: (R, E) → (R, 1, …, E); token weights unchanged.

    Raises:
        StateError: token-level weights whose shape does not match the site.
    """
    if w.dim() == 2 and y.dim() > 2 and (w.shape[0] in (1, y.shape[0])):
        return w.view(w.shape[0], *([1] * (y.dim() - 2)), w.shape[-1])  # (R, 1, …, E)
    if w.shape[:-1] == y.shape[:-1] or w.dim() == 1:
        return w
    if w.dim() == 2 and y.dim() == 2 and w.shape[0] in (1, y.shape[0]):
        return w
    raise StateError(
        f"routing weights of shape {tuple(w.shape)} do not fit a site output of shape {tuple(y.shape)}; "
        "token-level routing needs every site of the Mix to see the same tokens as the router"
    )


def mean_weights(w: Weights) -> Weights:
    """``mean`` aggregation: the unweighted mean of the selected (non-zero weight) candidates."""
    if isinstance(w, RowGroups):
        return w
    on = (w > 0).to(w.dtype)
    return on / on.sum(-1, keepdim=True).clamp_min(1.0)


def mix_ops(ops: Sequence[Callable], x: torch.Tensor, y: torch.Tensor, w: Weights) -> torch.Tensor:
    """The same for composed candidates (``op(x, y) -> y'``): y + Σᵢ wᵢ (opᵢ(x, y) − y)."""
    return generic_mix([lambda a, b, op=op: op(a, b) - b for op in ops], x, y, w)


def generic_mix(deltas: Sequence[Callable], x: torch.Tensor, y: torch.Tensor, w: Weights) -> torch.Tensor:
    """The fallback mixer: a loop over the active candidates (E), never over rows."""
    if isinstance(w, RowGroups):
        if w.single is not None:
            return y + deltas[w.single](x, y)
        pieces = [deltas[c](_rows(x, r), y.index_select(0, r)) for c, r in zip(w.active, w.rows)]
        if not pieces:
            return y
        delta = torch.zeros_like(y).index_copy(0, torch.cat(w.rows), torch.cat(pieces))  # (B, …, D)
        return y + delta
    we = expand(w, y)
    out = y
    for i, fn in enumerate(deltas):
        out = out + we[..., i : i + 1] * fn(x, y)
    return out


def _rows(x: Any, rows: torch.Tensor) -> Any:
    return x.index_select(0, rows) if isinstance(x, torch.Tensor) else x


def deltas(parts: Sequence[nn.Module] | None, ops: Sequence[Callable], x: torch.Tensor,
           y: torch.Tensor) -> torch.Tensor:
    """Every candidate's Δy, stacked: (E, …, D)."""
    if parts is not None:
        return torch.stack([p(x, y) for p in parts])
    return torch.stack([op(x, y) - y for op in ops])


def weighted_sum(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σᵢ wᵢ Δyᵢ for stacked deltas (E, …, D) and weights broadcastable to (…, E)."""
    we = expand(w, d[0])  # (…, E)
    return torch.einsum("e...d,...e->...d", d, we.expand(*d.shape[1:-1], d.shape[0]))
