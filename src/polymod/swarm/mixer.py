"""Mixing remote experts at one site: one call per expert with its routed rows, renormalised on failure.

The batched mixer for :class:`~polymod.swarm.remote.RemotePart` (registered in
:data:`polymod.aggregation.mixers.MIXERS` by ``polymod/__init__.py``). For a Mix whose
candidates at a site are all remote, it computes y' = y + Σᵢ w̃ᵢ Δyᵢ where

* each expert i receives, in **one** call, only the rows (tokens) whose weight for it is
  non-zero — per-row routing: the rows of its group; token-level top-k: its tokens —
  and every call of the site is in flight at the same time (the step waits for the
  slowest answer, bounded by the deadline, not for the sum);
* experts that fail or miss the deadline are dropped for this call and the surviving
  weights are renormalised row by row, w̃ᵢ = wᵢ · Σⱼ wⱼ / Σ_{j answered} wⱼ (hivemind's
  ``k_min`` contract: the mixture of those who answered); a row none of whose experts
  answered keeps the host output y (never NaN). With per-row routing a row has one
  expert, so its drop leaves the host output there.

Candidates that are a mixture of local and remote parts go through the generic mixer,
where a dropped remote part contributes zero without renormalisation.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch

from polymod.aggregation.cache import StackCache
from polymod.aggregation.weighted import Weights, expand
from polymod.routing.groups import RowGroups
from polymod.swarm.remote import RemotePart


def remote_mixer(parts: Sequence[RemotePart], x: torch.Tensor, y: torch.Tensor, w: Weights, key: Hashable,
                 cache: StackCache) -> torch.Tensor:
    """y + Σᵢ w̃ᵢ Δyᵢ over remote experts (see the module docstring)."""
    d = y.shape[-1]
    ys = y.reshape(-1, d)  # (N, D)
    xs = x.reshape(ys.shape[0], *x.shape[y.dim() - 1:])  # (N, …)
    if isinstance(w, RowGroups):
        tokens = ys.shape[0] // w.size  # rows of the batch → token rows (B·T)
        groups = [(c, _token_rows(r, tokens)) for c, r in zip(w.active, w.rows)]
        dense = None
    else:
        we = expand(w, y)
        dense = we.expand(*y.shape[:-1], we.shape[-1]).reshape(-1, we.shape[-1])  # (N, E)
        groups = [(i, (dense[:, i] != 0).nonzero().squeeze(1)) for i in range(len(parts))]
    groups = [(i, rows) for i, rows in groups if rows.numel()]
    pending = [(i, rows, parts[i].binding.start(parts[i].index, parts[i].rows(xs.index_select(0, rows),
                                                                              ys.index_select(0, rows))))
               for i, rows in groups]  # every call in flight before waiting for any
    answers = [(i, rows, parts[i].binding.finish(p)) for i, rows, p in pending]
    delta = torch.zeros_like(ys)  # (N, D)
    if dense is None:
        for _, rows, got in answers:
            if got is not None:
                delta.index_copy_(0, rows, got.to(ys.dtype))
        return y + delta.view(y.shape)
    ok = torch.zeros(dense.shape[-1], dtype=dense.dtype, device=dense.device)
    for i, _, got in answers:
        if got is not None:
            ok[i] = 1.0
    total, kept = dense.sum(-1), (dense * ok).sum(-1)  # (N,)
    scale = torch.where(kept != 0, total / torch.where(kept != 0, kept, torch.ones_like(kept)),
                        torch.zeros_like(kept))  # (N,) renormalisation over the answered experts
    for i, rows, got in answers:
        if got is not None:
            weight = (dense.index_select(0, rows)[:, i] * scale.index_select(0, rows)).unsqueeze(1)  # (n, 1)
            delta.index_add_(0, rows, weight.to(ys.dtype) * got.to(ys.dtype))
    return y + delta.view(y.shape)


def _token_rows(rows: torch.Tensor, tokens: int) -> torch.Tensor:
    """Batch rows → the indices of their tokens in the flattened (B·T) layout."""
    if tokens == 1:
        return rows
    offsets = torch.arange(tokens, device=rows.device)
    return (rows.unsqueeze(1) * tokens + offsets).reshape(-1)  # (n·T,)
