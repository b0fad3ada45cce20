"""Batched LoRA mixing: many LoRA modules at one site, in a few GEMMs.

Δyᵢ = sᵢ Bᵢ Aᵢ x for E modules of rank r. Two formulations, chosen by the
routing (measured in ``benchmarks/lora_formulations.py``):

* **gather + bmm** for one module per row (per-example routing, ``RowGroups``):
  stack A as (E+1, r, D_in) and sᵢBᵢᵀ as (E+1, r, D_out) — slot E is zero, for
  host-only rows — gather one slice per row and run two batched matmuls, the
  second fused with the addition (``baddbmm``). Cost: one rank-r LoRA per row,
  whatever E is. With few tokens per row (2T ≤ r, decoding) moving the weights
  costs more than moving the rows, so **grouped bmm** gathers the rows instead
  into per-module groups (zero-padded to the largest group) and scatters the
  result back.
* **concatenated rank** for dense weights (soft / top-k / task mixtures): one
  GEMM against A stacked as (E·r, D_in), scale each module's r columns by its
  weight, one GEMM against the stacked sᵢBᵢᵀ (E·r, D_out) fused with the
  addition (``addmm``). Cost: one rank-E·r LoRA — right for a few experts.

A third option, segment matmul (sort rows by module, one GEMM per module), is
a loop over E at every site; it lost to gather + bmm at every E measured.

When every row uses the same module the module's own fused ``add_into`` runs
(no gather). Stacks are cached across forwards at inference
(:class:`~polymod.aggregation.cache.StackCache`).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F

from polymod.aggregation.cache import StackCache
from polymod.aggregation.weighted import Weights, expand
from polymod.modules.lora import LoRAPart
from polymod.routing.groups import RowGroups


class _Group:
    """Static facts about LoRA parts mixed at one site (computed once per site and parts)."""

    __slots__ = ("tensors", "rank", "kind", "rate", "vocab")

    def __init__(self, parts: Sequence[LoRAPart]):
        self.tensors = tuple(t for p in parts for t in (p.A, p.B))
        self.rank, self.kind, self.vocab = parts[0].rank, parts[0].site_kind, parts[0].A.shape[1]
        rates = {float(getattr(p.dropout, "p", 0.0)) for p in parts}
        self.rate = rates.pop() if len(rates) == 1 else None

    @classmethod
    def of(cls, parts: Sequence[LoRAPart]) -> _Group | None:
        """The group, or None when the parts differ in rank or site kind (generic mixer)."""
        p0 = parts[0]
        if any(p.rank != p0.rank or p.site_kind != p0.site_kind or p.bias is not None for p in parts):
            return None
        group = cls(parts)
        return group if group.rate is not None else None


def _stacked(parts: Sequence[LoRAPart], g: _Group, key: Hashable, cache: StackCache,
             like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A as (E+1, r, D_in) and sBᵀ as (E+1, r, D_out), slot E zero (and Aᵀ rows ((E+1)·V, r) at embeddings)."""

    def build() -> tuple[torch.Tensor, ...]:
        a = torch.stack([p.A for p in parts] + [torch.zeros_like(parts[0].A)])  # (E+1, r, D_in)
        b = torch.stack([p.B.t() * p.scaling for p in parts] + [torch.zeros_like(parts[0].B.t())])  # (E+1, r, D_out)
        if g.kind != "embedding":
            return a, b
        return a, b, a.transpose(1, 2).reshape(-1, g.rank)  # ((E+1)·V, r): row lookup of every Aᵀ

    return cache.get((key, "stack"), lambda: g.tensors, build, like)


def _concatenated(parts: Sequence[LoRAPart], g: _Group, key: Hashable, cache: StackCache,
                  like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A as (E·r, D_in) and sBᵀ as (E·r, D_out)."""

    def build() -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.cat([p.A for p in parts])  # (E·r, D_in)
        b = torch.cat([p.B.t() * p.scaling for p in parts])  # (E·r, D_out)
        return a, b

    return cache.get((key, "cat"), lambda: g.tensors, build, like)


def lora_mixer(parts: Sequence[LoRAPart], x: torch.Tensor, y: torch.Tensor, w: Weights, key: Hashable,
               cache: StackCache) -> torch.Tensor | None:
    """y + Σᵢ wᵢ sᵢ Bᵢ Aᵢ x for LoRA parts of one rank, site kind and dropout (None: use the generic mixer)."""
    g = cache.meta((key, "lora"), lambda: _Group.of(parts))
    if g is None:
        return None
    if isinstance(w, RowGroups) and w.single is not None:
        return parts[w.single].add_into(x, y)
    if g.rate > 0 and g.kind != "embedding" and parts[0].dropout.training:
        x = F.dropout(x, g.rate, training=True)  # one mask shared by the modules of a row
    if isinstance(w, RowGroups):
        return _gather_bmm(parts, g, x, y, w, key, cache)
    return _concat_rank(parts, g, x, y, w, key, cache)


def _gather_bmm(parts: Sequence[LoRAPart], g: _Group, x: torch.Tensor, y: torch.Tensor, w: RowGroups,
                key: Hashable, cache: StackCache) -> torch.Tensor:
    rows, d_out = y.shape[0], y.shape[-1]
    stacks = _stacked(parts, g, key, cache, y)
    if g.kind != "embedding" and 2 * (x.numel() // (rows * x.shape[-1])) <= g.rank:
        return _grouped_bmm(parts, stacks, x, y, w)
    idx = w.padded_index()  # (B,) module per row, E for host-only rows
    if g.kind == "embedding":
        offset = idx.view(-1, *([1] * (x.dim() - 1))) * g.vocab  # (B, 1): each row reads its module's rows
        h = F.embedding(x + offset, stacks[2]).reshape(rows, -1, g.rank)  # (B, T, r)
    else:
        x3 = x.reshape(rows, -1, x.shape[-1])  # (B, T, D_in)
        h = torch.bmm(x3, stacks[0].index_select(0, idx).transpose(1, 2))  # (B, T, r)
    out = torch.baddbmm(y.reshape(rows, -1, d_out), h, stacks[1].index_select(0, idx))  # (B, T, D_out)
    return out.view(y.shape)


def _grouped_bmm(parts: Sequence[LoRAPart], stacks: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor,
                 w: RowGroups) -> torch.Tensor:
    """Few tokens per row: move the rows (not the weights) into per-module groups, two bmm, move back."""
    rows, d_in, d_out = y.shape[0], x.shape[-1], y.shape[-1]
    slots, where, active, width, padded = w.grouped()
    a, bt = stacks[0], stacks[1]
    if len(w.active) == len(parts):
        a, bt = a[:-1], bt[:-1]  # (E, r, D): every module has rows
    else:
        a, bt = a.index_select(0, active), bt.index_select(0, active)  # (A, r, D)
    x3 = x.reshape(rows, -1, d_in)  # (B, T, D_in)
    if padded:
        x3 = torch.cat([x3, x3.new_zeros(1, *x3.shape[1:])])  # (B+1, T, D_in): row B is the zero row
    xs = x3.index_select(0, slots)  # (A·m, T, D_in) rows grouped by module
    h = torch.bmm(xs.view(a.shape[0], -1, d_in), a.transpose(1, 2))  # (A, m·T, r)
    delta = torch.bmm(h, bt).view(-1, x3.shape[1], d_out)  # (A·m, T, D_out)
    if padded:
        return y + delta.index_select(0, where).view(y.shape)  # each row back from its slot
    return y.reshape(rows, -1, d_out).index_add(0, slots, delta).view(y.shape)  # (B, T, D_out)


def _concat_rank(parts: Sequence[LoRAPart], g: _Group, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
                 key: Hashable, cache: StackCache) -> torch.Tensor:
    a, bt = _concatenated(parts, g, key, cache, y)
    h = F.embedding(x, a.t()) if g.kind == "embedding" else F.linear(x, a)  # (…, E·r)
    we = expand(w.to(h.dtype), y).unsqueeze(-1)  # (…, E, 1): each module's weight on its r columns
    h = (h.unflatten(-1, (-1, g.rank)) * we).flatten(-2)  # (…, E, r) → (…, E·r)
    out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), bt)  # (N, D_out)
    return out.view(y.shape)

