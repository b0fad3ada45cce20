"""Computation functions: one file per module kind, each registering itself."""

from polymod.modules.contract import Module, ModuleSpec, register, registered_kinds
from polymod.modules.lora import LoRA

__all__ = ["Module", "ModuleSpec", "register", "registered_kinds", "LoRA"]
