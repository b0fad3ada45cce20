"""Interoperability with other libraries' formats: PEFT and AdapterHub ``adapters``.

Each format is a :class:`~polymod.format.Loader` in :data:`LOADERS`; ``polymod``
registers them with :mod:`polymod.format`, so ``pm.load`` reads a PEFT or
``adapters`` directory like a polymod package.
"""

from __future__ import annotations

from polymod.format import Loader, detect
from polymod.interop.adapters import is_adapters_dir, read_adapters
from polymod.interop.peft import is_peft_dir, read_peft, read_peft_modules, write_peft

LOADERS = (
    Loader("peft", is_peft_dir, read_peft),
    Loader("adapters", is_adapters_dir, read_adapters),
)
"""The foreign formats ``pm.load`` detects, registered with :mod:`polymod.format` by ``polymod/__init__``."""

__all__ = ["LOADERS", "detect", "read_adapters", "read_peft", "read_peft_modules", "write_peft"]
