"""Stacked module weights, cached across forwards at inference.

The batched mixers (:mod:`polymod.aggregation.mixers`) stack the parameters of
the modules they mix at a site — LoRA's A as (E, r, D_in), IA³'s scales as
(E, D), ... — so that one gather or one GEMM serves every row. Stacking costs a
copy per site per forward; at inference the parameters do not change between
forwards, so :class:`StackCache` keeps the stacks until they do. One cache
belongs to each :class:`~polymod.Modular` (it is per-call engine state).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch


class StackCache:
    """Stacked module weights per (site, parts), reused across forwards at inference.

    While gradients flow to the parts (training) the stack is rebuilt every
    forward so autograd sees it; otherwise it is rebuilt only when a part's
    tensors changed (``Tensor._version``, bumped by every in-place update such as
    an optimiser step or ``load_state_dict``), moved (``.to()``: another device or
    dtype than the site input), and when leaving ``torch.inference_mode`` (its
    tensors cannot enter autograd).
    Keys name the parts by identity; replacing a part's ``Parameter`` object
    (rather than updating it) is not seen.

    Why the private ``Tensor._version``: it is the only signal PyTorch keeps of an in-place change
    (no public API says "this tensor was written since"), and it costs one attribute read per tensor.
    The alternatives cost more than the cache saves: hashing or comparing the weights reads them all
    every forward, and rebuilding the stacks every forward is the no-cache case, measured last
    session at 1.81x the bare host's decode step against 1.28x with this cache (mixed-batch LoRA
    decode, benchmarks/mixed_batch.py). ``_version`` has been stable since PyTorch 1.0 (autograd's
    saved-tensor checks rely on it); should it change, test_routing_rows.py's
    ``test_rows_are_grouped_once_and_reuse_cached_stacks`` (an in-place update must invalidate the
    stacks) fails rather than stale weights being served.
    """

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self._store: dict[Hashable, list] = {}  # key -> [tensors, versions, value]
        self._meta: dict[Hashable, Any] = {}

    def get(self, key: Hashable, tensors: Callable[[], Sequence[torch.Tensor]], build: Callable[[], Any],
            like: torch.Tensor | None = None) -> Any:
        """The cached value of ``build()`` for ``key`` while the tensors it reads are unchanged.

        ``like`` (the site input) catches modules moved to another device or dtype.
        """
        hit = self._store.get(key)
        if hit is not None and like is not None and (hit[3].device != like.device or hit[3].dtype != like.dtype):
            hit = None  # the module moved (.to()): read its tensors afresh
        current = tuple(tensors())
        if torch.is_grad_enabled() and any(t.requires_grad for t in current):
            return build()
        held = hit[0] if hit is not None else tuple(t.detach() for t in current)  # aliases share _version
        versions = [t._version for t in held]
        versions.append(torch.is_inference_mode_enabled())  # inference tensors cannot enter autograd later
        if hit is not None and hit[1] == versions:
            return hit[2]
        if len(self._store) >= self.limit:
            self._store.clear()
        value = build()
        self._store[key] = [held, versions, value, held[0]]
        return value

    def meta(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """Static facts about ``key``'s parts (ranks, rates), computed once."""
        if key not in self._meta:
            if len(self._meta) >= self.limit:
                self._meta.clear()
            self._meta[key] = build()
        return self._meta[key]

    def clear(self) -> None:
        """Drop every cached stack."""
        self._store.clear()
        self._meta.clear()
