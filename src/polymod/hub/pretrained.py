"""One line from a host and a saved module (or hub reference) to a ready model (PEFT's ``from_pretrained``).

::

    model = pm.from_pretrained(host, "runs/sentiment/modules/sentiment")   # a saved module, any format
    model = pm.from_pretrained(host, "out/model")                          # pm.save_all: every module + composition
    model = pm.from_pretrained(host, "alice/sentiment@1.0.0")              # a hub reference (module or composition)

The module is checked against the host (an error if it cannot act there, a
``HostMismatchWarning`` if it was made on other weights), attached and made
active. A host that a :class:`~polymod.Modular` already wraps keeps its wrapper.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from polymod.bundle import is_model_dir, load_all
from polymod.format import load
from polymod.hub.api import get
from polymod.hub.composition import CompositionPackage
from polymod.hub.names import Ref
from polymod.modular import Modular, wrapper_of


def from_pretrained(host: nn.Module, source: str | os.PathLike, name: str | None = None, *, use: bool = True,
                    hub: Any = None, token: str | None = None) -> Modular:
    """Attach a saved module, a saved model or a hub reference to ``host`` and activate it.

    Args:
        host: the pretrained network (or a :class:`~polymod.Modular`; a host already wrapped keeps its wrapper).
        source: a directory — a module (polymod, PEFT or AdapterHub format) or a model saved by
            :func:`polymod.save_all` — or, when no such directory exists, a hub reference ``owner/name[@version]``.
        name: the library name of a single module (default: the card's name, else the directory or hub name).
        use: activate what was loaded (the module, or the saved composition).
        hub: the hub to pull from (default: the configured one).
        token: a hub token for private modules.

    Returns:
        The modular model, ready to run.

    Raises:
        FormatError: the directory holds nothing polymod reads.
        InvalidNameError: ``source`` is neither an existing directory nor a valid hub reference.
        IncompatibleHostError: the module does not fit ``host``.
    """
    model = host if isinstance(host, Modular) else (wrapper_of(host) or Modular(host))
    path = Path(source)
    if path.is_dir():
        if is_model_dir(path):
            load_all(model, path, use=use)
            return model
        loaded = load(path, host=model.host)
        default = path.resolve().name
    else:
        ref = Ref.parse(str(source))
        loaded = get(str(ref), host=model.host, hub=hub, token=token)
        default = ref.name
    if isinstance(loaded, CompositionPackage):
        loaded.attach(model, hub=hub, token=token)
        return model
    name = name or loaded.card.name or default
    model.add(name, loaded)
    if use:
        model.use(name)
    return model


__all__ = ["from_pretrained"]
