"""Batched mixers: one formulation per module kind for mixing many parts at one site.

A *mixer* computes y + Σᵢ wᵢ Δyᵢ for parts of one kind in a few batched
operations instead of one call per part: LoRA's gather + bmm and concatenated
rank (:mod:`~polymod.aggregation.lora_mix`), IA³'s stacked scales
(:mod:`~polymod.aggregation.ia3_mix`), bottleneck adapters' gathered weights
(:mod:`~polymod.aggregation.adapter_mix`). ``mixer(parts, x, y, weights, key,
cache)`` returns ``y'``, or None to fall back to the generic mixer (parts with
different hyper-parameters); ``key`` names the site and parts for the
:class:`~polymod.aggregation.cache.StackCache`.

:data:`MIXERS` is the one table of them: a kind with a batched formulation adds
its part class and mixer here (a kind in an outer layer, the swarm's remote parts,
through :func:`register_mixer`, called from ``polymod/__init__.py``); every other
kind uses :func:`~polymod.aggregation.weighted.generic_mix`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn

from polymod.aggregation.adapter_mix import adapter_mixer
from polymod.aggregation.cache import StackCache
from polymod.aggregation.ia3_mix import ia3_mixer
from polymod.aggregation.lora_mix import lora_mixer
from polymod.aggregation.weighted import Weights, generic_mix
from polymod.modules.adapter import AdapterPart
from polymod.modules.ia3 import IA3Part
from polymod.modules.lora import LoRAPart
from polymod.routing.groups import RowGroups

Mixer = Callable[[Sequence[Any], torch.Tensor, torch.Tensor, Weights, Hashable, StackCache], torch.Tensor | None]

MIXERS: dict[type[nn.Module], Mixer] = {
    LoRAPart: lora_mixer,
    IA3Part: ia3_mixer,
    AdapterPart: adapter_mixer,
}


def register_mixer(part_class: type[nn.Module], mixer: Mixer) -> None:
    """Add the batched mixer of ``part_class`` to :data:`MIXERS` (for part classes outside the core).

    Raises:
        TypeError: another mixer is already registered for ``part_class``.
    """
    if MIXERS.get(part_class, mixer) is not mixer:
        raise TypeError(f"a mixer for {part_class.__name__} is already registered")
    MIXERS[part_class] = mixer


def mixer_for(parts: Sequence[nn.Module]) -> Mixer | None:
    """The batched mixer when every part has the same class and one is registered, else None."""
    cls = type(parts[0])
    if cls in MIXERS and all(type(p) is cls for p in parts):
        return MIXERS[cls]
    return None


def mix(parts: Sequence[nn.Module], x: torch.Tensor, y: torch.Tensor, w: Weights, key: Hashable,
        cache: StackCache, fast: Mixer | None) -> torch.Tensor:
    """y + Σᵢ wᵢ Δyᵢ for parts of one or several kinds.

    Args:
        parts: the candidates' parts at this site.
        x: the site input; y: the host's output there.
        w: row groups or dense weights over the parts.
        key: the site and parts, for the stack cache.
        cache: the model's stack cache.
        fast: the parts' batched mixer, resolved once by the caller (:func:`mixer_for`), or None.

    Returns:
        y' with the same shape as ``y``.
    """
    if isinstance(w, RowGroups):
        w.check_rows(y.shape[0], "this site")
    if fast is not None:
        out = fast(parts, x, y, w, key, cache)
        if out is not None:
            return out
    return generic_mix(list(parts), x, y, w)
