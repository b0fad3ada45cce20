"""The on-disk format of one module: ``module.json`` + ``weights.safetensors``.

``module.json`` is the module's :class:`~polymod.card.Card` (format version,
kind, config, sites, lineage, ...) whose ``host`` field is the *host
fingerprint*: the architecture and, per touched site, its geometry and the
shape, dtype and sha256 of the host weight there. ``weights.safetensors``
holds φ with keys ``<site>:<parameter>``. Nothing but safetensors is ever read
for weights: no pickle.

Writes are atomic: a module is written to a temporary sibling directory and
renamed into place, so a crash never leaves a half-written module.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from polymod.card import Card
from polymod.errors import FormatError
from polymod.modules.contract import Module, spec_from_dict
from polymod.sites import Site, named_layers

CARD_FILE = "module.json"
WEIGHTS_FILE = "weights.safetensors"


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, any device)."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def architecture(host: nn.Module) -> str:
    """The host's architecture name: ``config.architectures[0]`` or its class name."""
    archs = getattr(getattr(host, "config", None), "architectures", None)
    return archs[0] if archs else type(host).__name__


def fingerprint(host: nn.Module, sites: dict[str, Site]) -> dict[str, Any]:
    """The host fingerprint of a module acting at ``sites``: architecture plus touched tensors."""
    layers = named_layers(host)
    out: dict[str, Any] = {
        "architecture": architecture(host),
        "model_type": getattr(getattr(host, "config", None), "model_type", None),
        "sites": {},
    }
    for name, site in sites.items():
        entry: dict[str, Any] = {"kind": site.kind, "in": site.in_features, "out": site.out_features}
        weight = getattr(layers.get(name), "weight", None)
        if isinstance(weight, torch.Tensor):
            entry["weight"] = {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
                               "sha256": tensor_sha256(weight)}
        out["sites"][name] = entry
    return out


def check_host(module: Module, host: nn.Module) -> None:
    """Warn when ``host``'s touched weights differ from those the module was made on.

    Shapes are checked by the caller (:meth:`Modular.add`); here equal shapes
    with different values give a :class:`~polymod.errors.HostMismatchWarning`.
    """
    from polymod.modular import warn_host_mismatch

    recorded = module.card.host.get("sites", {}) if module.card.host else {}
    layers = named_layers(host)
    differing = []
    for name, entry in recorded.items():
        want = entry.get("weight", {}).get("sha256")
        weight = getattr(layers.get(name), "weight", None)
        if want and isinstance(weight, torch.Tensor) and tensor_sha256(weight) != want:
            differing.append(name)
    if differing:
        warn_host_mismatch(
            f"the host's weights at {len(differing)} of {len(recorded)} sites differ from those the module was "
            f"made on (first: {differing[0]}); shapes fit, so it loads, but results may differ"
        )


def save(module: Module, path: str | os.PathLike) -> Path:
    """Write ``module`` to directory ``path`` (created; replaced atomically if it exists).

    Returns:
        The directory written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{site}:{key}": value.detach().to("cpu").contiguous()
        for site, part in module.items()
        for key, value in part.state_dict().items()
    }
    card = module.card.to_dict()
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "polymod"})
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def read_card(path: str | os.PathLike) -> Card:
    """Read and validate ``module.json`` in directory ``path``.

    Raises:
        FormatError: missing or invalid card.
    """
    file = Path(path) / CARD_FILE
    if not file.is_file():
        raise FormatError(f"{path} is not a polymod module: {CARD_FILE} is missing")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FormatError(f"{file} is not valid JSON: {exc}") from exc
    return Card.from_dict(data)


def load(path: str | os.PathLike, host: nn.Module | None = None) -> Module:
    """Load a module saved with :func:`save`, or a foreign adapter directory (format detected).

    Only ``weights.safetensors`` is read for tensors; the parts are rebuilt from
    the card's kind and config and must match the stored tensors exactly.
    A directory without ``module.json`` is handed to :func:`polymod.interop.load_foreign`
    (PEFT and AdapterHub ``adapters`` directories); a composition package
    (card kind ``composition``) loads as a :class:`~polymod.hub.composition.CompositionPackage`.

    Args:
        path: the directory.
        host: the host, used only by foreign formats that need its shapes (PEFT IA³).

    Raises:
        FormatError: missing files, invalid card, unreadable weights, or weights that
            do not match the parts the card describes.
    """
    path = Path(path)
    if path.is_dir() and not (path / CARD_FILE).is_file():
        from polymod.interop import load_foreign

        return load_foreign(path, host=host)
    card = read_card(path)
    if card.kind == "composition":
        from polymod.hub.composition import load_composition

        return load_composition(path)  # type: ignore[return-value]
    spec = spec_from_dict(card.kind, card.config)
    geometry = card.host.get("sites", {}) if card.host else {}
    sites = []
    for name in card.sites:
        g = geometry.get(name)
        if g is None:
            raise FormatError(f"{path}/{CARD_FILE} lists site {name!r} without its geometry under host.sites")
        sites.append(Site(name, g["kind"], g["in"], g["out"]))
    weights_file = path / WEIGHTS_FILE
    if not weights_file.is_file():
        raise FormatError(f"{path} has no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise FormatError(f"{weights_file} is not a readable safetensors file: {exc}") from exc
    module = Module(spec, sites, [spec.build_part(s, None) for s in sites], card=card)
    expected = {f"{site}:{k}": v for site, part in module.items() for k, v in part.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{weights_file} does not match its card: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, want in expected.items():
        if tensors[key].shape != want.shape:
            raise FormatError(f"{weights_file}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                              f"the card's config implies {tuple(want.shape)}")
    for site, part in module.items():
        prefix = f"{site}:"
        part.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    return module


__all__ = ["save", "load", "read_card", "fingerprint", "check_host", "tensor_sha256"]
