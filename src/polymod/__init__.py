"""polymod: modular deep learning — modules, routing, aggregation and a hub.

The public API (see the README)::

    import polymod as pm
    model = pm.Modular(host)
    model.add("task", pm.LoRA(rank=8, sites="attn.q|attn.v"))
    model.use("task")
"""

from polymod.card import Card, Lineage, Parent
from polymod.compose import Stack
from polymod.errors import (
    CompositionError,
    ConfigError,
    FormatError,
    HostMismatchWarning,
    IncompatibleHostError,
    PolymodError,
    SiteNotFoundError,
    StateError,
    UnknownModuleError,
)
from polymod.hub.format import load, save
from polymod.modular import AttachReport, Modular
from polymod.modules import LoRA, Module, registered_kinds
from polymod.sites import Site, SiteSelector, select

__version__ = "0.1.0"

__all__ = [
    "AttachReport",
    "Card",
    "CompositionError",
    "ConfigError",
    "FormatError",
    "HostMismatchWarning",
    "IncompatibleHostError",
    "Lineage",
    "LoRA",
    "Modular",
    "Module",
    "Parent",
    "PolymodError",
    "Site",
    "SiteNotFoundError",
    "SiteSelector",
    "Stack",
    "StateError",
    "UnknownModuleError",
    "load",
    "registered_kinds",
    "save",
    "select",
]
