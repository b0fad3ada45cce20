"""Batched bottleneck-adapter mixing for one adapter per row (gather + bmm).

A bottleneck adapter adds f_φ(h) = LN_a(s · (U σ(D LN_b(h) + b_D) + b_U)) to the
residual stream. With one adapter per row (row groups) every parameter is
stacked over the E adapters — slot E zero, for host-only rows — and gathered per
row: the down- and up-projections become two ``baddbmm`` (bias as the added
term), the optional LayerNorms a plain normalisation followed by the row's own
gain and bias. s is folded into U and b_U. One pass for the whole batch, no
loop over adapters.

Only adapters that agree on activation, placement (which tensor they read),
LayerNorms and dropout are batched; others, dense mixture weights (every adapter
on every row: no saving) and adapters at input sites use the generic mixers.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

from polymod.aggregation.cache import StackCache
from polymod.aggregation.weighted import Weights
from polymod.modules.adapter import ACTIVATIONS, AdapterPart
from polymod.routing.groups import RowGroups


def _signature(p: AdapterPart) -> tuple:
    def eps(norm):
        return None if norm is None else norm.eps

    return (p.activation, p.reads_input, eps(p.norm_before), eps(p.norm_after), float(getattr(p.dropout, "p", 0.0)),
            p.down.weight.shape, p.up.weight.shape)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(tensors + [torch.zeros_like(tensors[0])])  # (E+1, …), slot E zero


def _stacks(parts: Sequence[AdapterPart], key: Hashable, cache: StackCache,
            like: torch.Tensor) -> dict[str, torch.Tensor]:
    def build() -> dict[str, torch.Tensor]:
        out = {"down": _stack([p.down.weight for p in parts]).transpose(1, 2),  # (E+1, D_in, r)
               "down_b": _stack([p.down.bias for p in parts]).unsqueeze(1),  # (E+1, 1, r)
               "up": _stack([p.up.weight.t() * p.scaling for p in parts]),  # (E+1, r, D_out)
               "up_b": _stack([p.up.bias * p.scaling for p in parts]).unsqueeze(1)}  # (E+1, 1, D_out)
        for name in ("norm_before", "norm_after"):
            if getattr(parts[0], name) is not None:
                out[name] = _stack([getattr(p, name).weight for p in parts]).unsqueeze(1)  # (E+1, 1, D)
                out[name + "_b"] = _stack([getattr(p, name).bias for p in parts]).unsqueeze(1)  # (E+1, 1, D)
        return out

    return cache.get((key, "adapter"), lambda: [t for p in parts for t in p.parameters()], build, like)


def _norm(h: torch.Tensor, gain: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(h, h.shape[-1:], eps=eps) * gain + bias  # each row's own affine


def adapter_mixer(parts: Sequence[AdapterPart], x: torch.Tensor, y: torch.Tensor, w: Weights, key: Hashable,
                  cache: StackCache) -> torch.Tensor | None:
    """y + f_φ(row)(h) for one adapter per row at an output site (None: use the generic mixer)."""
    if not isinstance(w, RowGroups) or not isinstance(y, torch.Tensor):
        return None
    same = cache.meta((key, "adapter-sig"), lambda: len({_signature(p) for p in parts}) == 1)
    if not same:
        return None
    if w.single is not None:
        return parts[w.single].add_into(x, y)
    p0 = parts[0]
    s = _stacks(parts, key, cache, y)
    idx = w.padded_index()  # (B,)
    rows = y.shape[0]
    src = x if p0.reads_input else y
    h = src.reshape(rows, -1, src.shape[-1])  # (B, T, D_in)
    if p0.norm_before is not None:
        h = _norm(h, s["norm_before"][idx], s["norm_before_b"][idx], p0.norm_before.eps)  # (B, T, D_in)
    z = torch.baddbmm(s["down_b"][idx], h, s["down"][idx])  # (B, T, r)
    z = ACTIVATIONS[p0.activation](z)
    out = torch.baddbmm(s["up_b"][idx], z, s["up"][idx])  # (B, T, D_out)
    out = p0.dropout(out)
    if p0.norm_after is not None:
        out = _norm(out, s["norm_after"][idx], s["norm_after_b"][idx], p0.norm_after.eps)
    return y + out.view(y.shape)

