"""Representation aggregation: y' = y + Σᵢ wᵢ Δyᵢ at a site, batched per module kind.

The survey's representation-level aggregation (§5.2): the active modules'
outputs are combined by a weighted sum (the router's weights), by their mean,
or by attention (AdapterFusion, in :mod:`polymod.routing.attention`).

Weights come as one of

* a :class:`~polymod.routing.groups.RowGroups` — each row uses at most one
  candidate (per-example routing); or
* a dense tensor over the E candidates: (R, E) per task/row (R = 1 or B), or
  ``y.shape[:-1] + (E,)`` per token.

A *mixer* computes the combination for parts of one kind. Kinds register a
batched mixer with :func:`register_mixer` (LoRA's gather + bmm and
concatenated-rank formulations live in :mod:`polymod.aggregation.lora_mix`);
every other kind uses the generic mixer, which loops over the active
candidates (E), never over rows: with row groups each candidate runs once on
its rows (index_select → part → index_copy), with dense weights each candidate
runs on the whole batch and is scaled by its weight.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn

from polymod.errors import StateError
from polymod.routing.groups import RowGroups

Weights = torch.Tensor | RowGroups
Mixer = Callable[[Sequence[nn.Module], torch.Tensor, torch.Tensor, Weights, Hashable, "StackCache"], Any]

_MIXERS: dict[type, Mixer] = {}


def register_mixer(part_cls: type, mixer: Mixer) -> None:
    """Register a batched mixer for parts of class ``part_cls``.

    ``mixer(parts, x, y, weights, key, cache)`` returns ``y'`` or None to fall
    back to the generic mixer (e.g. parts with different hyper-parameters).
    ``key`` identifies the site and parts for :class:`StackCache`.
    """
    _MIXERS[part_cls] = mixer


def mixer_for(parts: Sequence[nn.Module]) -> Mixer | None:
    """The registered mixer when every part has the same class, else None."""
    cls = type(parts[0])
    if cls in _MIXERS and all(type(p) is cls for p in parts):
        return _MIXERS[cls]
    return None


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


def mix(parts: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, w: Weights, key: Hashable,
        cache: StackCache, fast: Mixer | None | bool = True) -> torch.Tensor:
    """y + Σᵢ wᵢ Δyᵢ for parts of one or several kinds (batched mixer when registered).

    ``fast`` is the parts' mixer when the caller resolved it once (:func:`mixer_for`),
    None for the generic mixer, or True to look it up here.
    """
    if isinstance(w, RowGroups):
        w.check_rows(y.shape[0], "this site")
    if fast is True:
        fast = mixer_for(parts)
    if fast is not None:
        out = fast(parts, x, y, w, key, cache)
        if out is not None:
            return out
    return generic_mix(list(parts), x, y, w)


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


# Built-in batched mixers register themselves on import.
from polymod.aggregation import adapter_mix as _adapter_mix  # noqa: E402, F401
from polymod.aggregation import ia3_mix as _ia3_mix  # noqa: E402, F401
from polymod.aggregation import lora_mix as _lora_mix  # noqa: E402, F401
