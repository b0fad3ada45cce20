"""Interoperability with other libraries' formats: PEFT and AdapterHub ``adapters``.

:func:`load_foreign` detects a directory's format from its files; ``pm.load``
calls it for any directory without ``module.json``.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from polymod.errors import FormatError
from polymod.interop.adapters import is_adapters_dir, read_adapters
from polymod.interop.peft import is_peft_dir, read_peft, write_peft
from polymod.modules.contract import Module


def detect(path: str | os.PathLike) -> str | None:
    """``polymod``, ``peft``, ``adapters`` or None: the format of the directory at ``path``."""
    path = Path(path)
    if (path / "module.json").is_file():
        return "polymod"
    if is_peft_dir(path):
        return "peft"
    if is_adapters_dir(path):
        return "adapters"
    return None


def load_foreign(path: str | os.PathLike, host: nn.Module | None = None) -> Module:
    """Load a PEFT or ``adapters`` directory as a polymod module (format detected).

    Raises:
        FormatError: the directory is in no format polymod reads.
    """
    fmt = detect(path)
    if fmt == "peft":
        return read_peft(path, host)
    if fmt == "adapters":
        return read_adapters(path, host)
    raise FormatError(f"{path} is not a module polymod can read: expected module.json (polymod), "
                      "adapter_config.json + adapter_model.safetensors (PEFT) or adapter_config.json + "
                      "adapter.safetensors (AdapterHub adapters)")


__all__ = ["detect", "load_foreign", "read_adapters", "read_peft", "write_peft"]
