"""Modules merged into the host weights, and the originals that undo them bit for bit.

``Modular.merge_into_host(name)`` adds a parameter-composition module's ΔW (and
Δb, for kinds that change the bias) into the host layers, for the inference
speed of the bare host. :class:`MergedWeights` keeps a copy of every original
tensor it changed, so ``unmerge`` and ``detach`` restore the host exactly.
"""

from __future__ import annotations

import torch
from torch import nn

from polymod.errors import StateError
from polymod.modules.contract import BiasDelta, Module


class MergedWeights:
    """The merged modules of one model: name → {site (or ``"site#bias"``) → original tensor}."""

    def __init__(self) -> None:
        self._originals: dict[str, dict[str, torch.Tensor]] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._originals

    def names(self) -> list[str]:
        """The merged modules, in merge order."""
        return list(self._originals)

    def merge(self, name: str, module: Module, layers: dict[str, nn.Module], host: nn.Module) -> None:
        """Add ``module``'s weight (and bias) deltas into the host ``layers``, keeping the originals.

        Raises:
            StateError: already merged, not a parameter-composition module, or a site's
                weight is tied to another layer (merging would change both).
        """
        if name in self._originals:
            raise StateError(f"module {name!r} is already merged into the host; unmerge it first")
        if not module.mergeable:
            raise StateError(f"module {name!r} is a {module.kind} module, which has no weight delta to merge")
        tied = _tied_weights(host)
        for site in module.sites:
            names = tied.get(id(layers[site].weight), [])
            if len(names) > 1:
                raise StateError(
                    f"cannot merge {name!r}: the weight at {site!r} is shared by {', '.join(names)}; "
                    "merging would change every layer that shares it"
                )
        deltas = module.delta(layers)
        originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for site, delta in deltas.items():
                weight = layers[site].weight
                originals[site] = weight.detach().clone()
                weight.add_(delta.to(weight.dtype))
            for site, part in module.items():  # kinds that also change the bias (IA³ scaling an output)
                bias = getattr(layers[site], "bias", None)
                delta = part.delta_bias(layers[site]) if isinstance(part, BiasDelta) else None
                if delta is not None and isinstance(bias, torch.Tensor):
                    originals[f"{site}#bias"] = bias.detach().clone()
                    bias.add_(delta.to(bias.dtype))
        self._originals[name] = originals

    def forget(self, name: str) -> None:
        """Drop the originals of ``name``: its merge becomes the host's own weights (``merge_and_unload``)."""
        self._originals.pop(name)

    def unmerge(self, name: str, layers: dict[str, nn.Module]) -> None:
        """Copy the saved originals of ``name`` back into the host ``layers``.

        Raises:
            StateError: the module is not merged.
        """
        if name not in self._originals:
            raise StateError(f"module {name!r} is not merged into the host")
        with torch.no_grad():
            for key, original in self._originals.pop(name).items():
                site, _, attr = key.partition("#")  # "site" (weight) or "site#bias"
                getattr(layers[site], attr or "weight").copy_(original)


def _tied_weights(host: nn.Module) -> dict[int, list[str]]:
    """Parameter id → every name it has in ``host`` (more than one when weights are tied)."""
    out: dict[int, list[str]] = {}
    for n, p in host.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(n)
    return out
