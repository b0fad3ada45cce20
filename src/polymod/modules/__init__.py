"""Computation functions: one file per module kind, each registering itself."""

import sys

from polymod.modules import hyperlora
from polymod.modules.adapter import Adapter
from polymod.modules.contract import Module, ModuleSpec, register, registered_kinds
from polymod.modules.delta import Delta
from polymod.modules.head import Head
from polymod.modules.hyperlora import HyperLoRA
from polymod.modules.ia3 import IA3
from polymod.modules.invertible import Invertible
from polymod.modules.lora import LoRA
from polymod.modules.prefix import PrefixTuning
from polymod.modules.prompt import PromptTuning
from polymod.modules.sparse import SparseFT

__all__ = ["Module", "ModuleSpec", "register", "registered_kinds", "LoRA", "IA3", "SparseFT", "Adapter", "Invertible",
           "Delta", "Head", "PromptTuning", "PrefixTuning", "HyperLoRA"]

# modules/hyper.py was renamed hyperlora.py (0.2; "hyper" alone read as the hub); the docs showed
# `from polymod.modules import hyper`, so the old path stays an alias of the renamed module.
sys.modules.setdefault("polymod.modules.hyper", hyperlora)
hyper = hyperlora
