"""Loading checks: does a module's recorded host fingerprint fit this host?

A card's ``host`` field records the architecture, model type and, per site,
its geometry and the sha256 of the host weight there (see
:func:`polymod.format.fingerprint`). Against a live host:

* a site that is missing, or whose kind or width differs, is an **error**
  (:class:`~polymod.errors.IncompatibleHostError`) naming every difference;
* a different architecture or model type with every site fitting, or weights
  that differ at fitting sites (another fine-tune of the same base), is a
  **warning** (:class:`~polymod.errors.HostMismatchWarning`): it loads, but
  results may differ from those on the card.
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from polymod.card import Card
from polymod.errors import HostMismatchWarning, IncompatibleHostError
from polymod.sites import named_layers, site_of


def compare(card: Card, host: nn.Module) -> tuple[list[str], list[str]]:
    """Compare a card's host fingerprint with ``host``.

    Returns:
        (errors, warnings): human-readable differences.
    """
    from polymod.format import architecture, tensor_sha256

    recorded: dict[str, Any] = card.host or {}
    errors: list[str] = []
    notes: list[str] = []
    layers = named_layers(host)
    missing, differing_weights = [], []
    for name in card.sites:
        entry = recorded.get("sites", {}).get(name, {})
        layer = layers.get(name)
        if layer is None:
            missing.append(name)
            continue
        have = site_of(name, layer)
        want = (entry.get("kind"), entry.get("in"), entry.get("out"))
        if entry and want != (have.kind, have.in_features, have.out_features):
            errors.append(f"site {name}: module expects a {want[0]} {want[1]}->{want[2]}, "
                          f"host has a {have.kind} {have.in_features}->{have.out_features}")
        sha = entry.get("weight", {}).get("sha256")
        weight = getattr(layer, "weight", None)
        if sha and weight is not None and tuple(weight.shape) == tuple(entry["weight"].get("shape", ())):
            if tensor_sha256(weight) != sha:
                differing_weights.append(name)
    if missing:
        errors.insert(0, f"{len(missing)} of {len(card.sites)} sites are missing from the host "
                         f"(first: {missing[0]}; host layers look like {next(iter(layers), '?')})")
    arch, model_type = recorded.get("architecture"), recorded.get("model_type")
    host_arch = architecture(host)
    host_type = getattr(getattr(host, "config", None), "model_type", None)
    if arch and arch != host_arch:
        (errors if errors else notes).append(f"architecture: module made for {arch}, host is {host_arch}")
    if model_type and host_type and model_type != host_type:
        (errors if errors else notes).append(f"model_type: module made for {model_type}, host is {host_type}")
    if differing_weights:
        notes.append(f"host weights differ at {len(differing_weights)} of {len(card.sites)} sites "
                     f"(first: {differing_weights[0]}): another checkpoint of the same architecture")
    return errors, notes


def check(card: Card, host: nn.Module, label: str = "module") -> None:
    """Raise on an incompatible host, warn on a compatible but different one.

    Raises:
        IncompatibleHostError: the host lacks sites or their geometry differs; the message lists what differs.
    """
    errors, notes = compare(card, host)
    if errors:
        raise IncompatibleHostError(f"{label} does not fit this host: " + "; ".join(errors[:6])
                                    + ". Load it onto the host it was made for (see its card's 'host').")
    if notes:
        warnings.warn(f"{label} was made for a different host: " + "; ".join(notes), HostMismatchWarning,
                      stacklevel=3)
