"""Save and load a whole modular model: every module plus the active composition.

A model directory holds one module package per attached module (``<dir>/<name>/``,
written by :func:`polymod.save`) and ``composition.json``::

    {"format": "polymod-model", "format_version": 1,
     "modules": ["en", "sentiment"], "active": {"stack": ["en", "sentiment"]}}

:func:`load_all` attaches each module under its name (checked against the host,
as :func:`polymod.load` with ``host=`` does) and activates the saved composition.
The host itself is never written: a model directory is a few modules' worth of
bytes, and loads onto the host the modules were made for.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from polymod.compose import from_json, to_json
from polymod.errors import FormatError
from polymod.format import load, save
from polymod.modular import Modular

INDEX_FILE = "composition.json"
FORMAT = "polymod-model"
FORMAT_VERSION = 1


def save_all(model: Modular, path: str | os.PathLike, names: list[str] | None = None) -> Path:
    """Write modules of ``model`` (default: every attached one) and its active composition to directory ``path``.

    Args:
        model: the modular model.
        path: the directory (created); each module goes to ``path/<name>/``.
        names: which modules to write (default: all, in attach order).

    Returns:
        The directory written.
    """
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    names = model.names() if names is None else list(names)
    for name in names:
        save(model[name], out / name)
    index = {"format": FORMAT, "format_version": FORMAT_VERSION, "modules": names,
             "active": None if model.active is None else to_json(model.active)}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out


def read_index(path: str | os.PathLike) -> dict[str, Any]:
    """The ``composition.json`` of a model directory.

    Raises:
        FormatError: missing, unreadable, or of another format or version.
    """
    file = Path(path) / INDEX_FILE
    try:
        index = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path} is not a saved polymod model: cannot read {INDEX_FILE} ({exc})") from exc
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise FormatError(f"{file} is not a polymod model index (expected format {FORMAT!r})")
    if index.get("format_version") != FORMAT_VERSION:
        raise FormatError(f"{file} has format_version {index.get('format_version')!r}; this polymod reads "
                          f"{FORMAT_VERSION}")
    return index


def is_model_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory written by :func:`save_all`."""
    return (Path(path) / INDEX_FILE).is_file()


def load_all(model: Modular, path: str | os.PathLike, *, use: bool = True) -> list[str]:
    """Attach every module saved in ``path`` to ``model`` and (with ``use``) activate the saved composition.

    Returns:
        The names attached.

    Raises:
        FormatError: ``path`` is not a model directory or a module in it is unreadable.
        ConfigError: a module name is already attached.
        IncompatibleHostError: a module does not fit ``model``'s host.
    """
    index = read_index(path)
    names = list(index["modules"])
    for name in names:
        model.add(name, load(Path(path) / name, host=model.host))
    if use and index["active"] is not None:
        model.use(from_json(index["active"]))
    return names


__all__ = ["FORMAT", "INDEX_FILE", "is_model_dir", "load_all", "read_index", "save_all"]
