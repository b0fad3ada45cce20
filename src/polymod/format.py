"""The on-disk format of one module, the host fingerprint and the one fit check.

A module package is a directory with ``module.json`` — the module's
:class:`~polymod.card.Card` (format version, kind, config, sites, lineage, ...)
whose ``host`` field is the *host fingerprint*: the architecture and, per
touched site, its geometry and the shape, dtype and sha256 of the host weight
there — and ``weights.safetensors``, which holds φ with keys
``<site>:<parameter>`` (:func:`module_tensors`; the same layout gives a module's
content hash). Nothing but safetensors is ever read for weights: no pickle.

Writes are atomic: a module is written to a temporary sibling directory and
renamed into place, so a crash never leaves a half-written module.

Other formats register with this file rather than being imported by it:
:func:`register_loader` adds a reader for directories without ``module.json``
(PEFT, AdapterHub ``adapters``), :func:`register_package_kind` a reader for
card kinds that are not module kinds (composition packages). The registrations
are made in one place, ``polymod/__init__.py``.

:func:`check_fits` is the single answer to "does this module fit this host?",
used by :meth:`polymod.Modular.add`, :func:`load` with ``host=`` and hub pulls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from polymod.card import Card
from polymod.errors import ConfigError, FormatError, HostMismatchWarning, IncompatibleHostError, SiteNotFoundError
from polymod.modules.contract import Module, spec_from_dict
from polymod.sites import Site, input_site, is_input_site, named_layers, site_of

CARD_FILE = "module.json"
WEIGHTS_FILE = "weights.safetensors"
README_FILE = "README.md"
_METADATA = {"format": "polymod"}


# -- tensors -----------------------------------------------------------------------------


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes (any dtype, any device)."""
    raw = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def module_tensors(module: Module) -> dict[str, torch.Tensor]:
    """A module's tensors keyed ``<site>:<parameter>`` (CPU, contiguous): the layout of ``weights.safetensors``."""
    return {f"{site}:{key}": value.detach().to("cpu").contiguous()
            for site, part in module.items() for key, value in part.state_dict().items()}


def content_hash(module: Module) -> str:
    """sha256 of the ``weights.safetensors`` that :func:`save` writes for ``module`` (its content hash)."""
    return hashlib.sha256(safetensors_bytes(module_tensors(module), metadata=_METADATA)).hexdigest()


def load_tensors(module: Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy tensors laid out by :func:`module_tensors` into ``module``'s parts.

    Raises:
        FormatError: keys or shapes differ from what the module's parts hold.
    """
    expected = {f"{site}:{k}": v for site, part in module.items() for k, v in part.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise FormatError(f"{source} does not match its card: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for key, want in expected.items():
        if tensors[key].shape != want.shape:
            raise FormatError(f"{source}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                              f"the card's config implies {tuple(want.shape)}")
    for site, part in module.items():
        prefix = f"{site}:"
        part.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


# -- the host fingerprint and the fit check -------------------------------------------------


def architecture(host: nn.Module) -> str:
    """The host's architecture name: ``config.architectures[0]`` or its class name."""
    archs = getattr(getattr(host, "config", None), "architectures", None)
    return archs[0] if archs else type(host).__name__


def fingerprint(host: nn.Module, sites: dict[str, Site], weights: bool = True) -> dict[str, Any]:
    """The host fingerprint of a module acting at ``sites``: architecture plus touched tensors.

    Args:
        host: the host.
        sites: the module's sites by name.
        weights: record the shape, dtype and sha256 of the host weight at each site; False for
            modules whose function does not read them (a head holds its own copy of the layer).
    """
    layers = named_layers(host)
    out: dict[str, Any] = {
        "architecture": architecture(host),
        "model_type": getattr(getattr(host, "config", None), "model_type", None),
        "sites": {},
    }
    for name, site in sites.items():
        entry: dict[str, Any] = {"kind": site.kind, "in": site.in_features, "out": site.out_features}
        weight = getattr(layers.get(name), "weight", None)
        if weights and isinstance(weight, torch.Tensor):
            entry["weight"] = {"shape": list(weight.shape), "dtype": str(weight.dtype).removeprefix("torch."),
                               "sha256": tensor_sha256(weight)}
        out["sites"][name] = entry
    return out


@dataclass
class Fit:
    """How a module's recorded host compares with a live host.

    Attributes:
        errors: differences that make the module unusable there (missing sites, other geometry).
        warnings: differences it survives (another architecture name with fitting sites,
            other weights at fitting sites: another checkpoint of the same base).
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _live_site(host: nn.Module, layers: dict[str, nn.Module], name: str) -> Site | None:
    if is_input_site(name):
        try:
            return input_site(host, name)
        except SiteNotFoundError:
            return None
    layer = layers.get(name)
    return site_of(name, layer) if layer is not None else None


def recorded_site(card: Card, name: str, sites: Mapping[str, Site] | None = None) -> dict[str, Any]:
    """What a card's host fingerprint records of site ``name`` (kind, in, out, weight hash).

    A module built in memory from a foreign format may record no geometry; then its own
    site description from ``sites`` stands in (kind, in and out only).
    """
    entry = (card.host or {}).get("sites", {}).get(name) or {}
    if not entry and sites is not None and name in sites:
        own = sites[name]
        entry = {"kind": own.kind, "in": own.in_features, "out": own.out_features}
    return entry


def check_fits(card: Card, host: nn.Module, sites: Mapping[str, Site] | None = None) -> Fit:
    """Compare a card's host fingerprint with ``host`` (every site, architecture and weights).

    Args:
        card: the module's card (its ``sites`` and ``host`` fingerprint).
        host: the live host.
        sites: the module's own site descriptions, for sites whose geometry the card
            does not record (modules built in memory from foreign formats).

    Returns:
        The :class:`Fit`: errors and warnings, each a readable difference.
    """
    recorded: dict[str, Any] = card.host or {}
    fit = Fit()
    layers = named_layers(host)
    missing, differing = [], []
    for name in card.sites:
        entry = recorded_site(card, name, sites)
        have = _live_site(host, layers, name)
        if have is None:
            missing.append(name)
            continue
        want = (entry.get("kind"), entry.get("in"), entry.get("out"))
        if entry and want != (have.kind, have.in_features, have.out_features):
            fit.errors.append(f"site {name}: module expects a {want[0]} {want[1]}->{want[2]}, "
                              f"host has a {have.kind} {have.in_features}->{have.out_features}")
        sha = entry.get("weight", {}).get("sha256")
        weight = getattr(layers.get(name), "weight", None)
        if sha and isinstance(weight, torch.Tensor) and list(weight.shape) == list(entry["weight"].get("shape", ())):
            if tensor_sha256(weight) != sha:
                differing.append(name)
    if missing:
        fit.errors.insert(0, f"{len(missing)} of {len(card.sites)} sites are missing from the host "
                             f"(first: {missing[0]}; host layers look like {next(iter(layers), '?')})")
    arch, model_type = recorded.get("architecture"), recorded.get("model_type")
    host_type = getattr(getattr(host, "config", None), "model_type", None)
    other_type = bool(model_type and host_type and model_type != host_type)
    if arch and arch != architecture(host) and (fit.errors or other_type or differing):
        # Another head class on the same weights (BertForMaskedLM -> BertForSequenceClassification, as in
        # MAD-X) is the normal way to reuse a module: only worth saying when something else differs too.
        (fit.errors if fit.errors else fit.warnings).append(
            f"architecture: module made for {arch}, host is {architecture(host)}")
    if other_type:
        (fit.errors if fit.errors else fit.warnings).append(
            f"model_type: module made for {model_type}, host is {host_type}")
    if differing:
        fit.warnings.append(f"host weights differ at {len(differing)} of {len(card.sites)} sites "
                            f"(first: {differing[0]}) from those the module was made on: another checkpoint "
                            "of the same architecture, so it loads, but results may differ")
    return fit


def require_fit(card: Card, host: nn.Module, label: str, sites: Mapping[str, Site] | None = None) -> None:
    """Raise on a host the module cannot act on; warn (at the user's line) on one it survives.

    Raises:
        IncompatibleHostError: sites are missing or their geometry differs; the message lists what differs.
    """
    fit = check_fits(card, host, sites)
    if fit.errors:
        raise IncompatibleHostError(f"{label} does not fit this host: " + "; ".join(fit.errors[:6])
                                    + ". Load it onto the host it was made for (see its card's 'host').")
    if fit.warnings:
        warn_host_mismatch(f"{label} was made for a different host: " + "; ".join(fit.warnings))


def warn_host_mismatch(message: str) -> None:
    """Emit a :class:`~polymod.errors.HostMismatchWarning` attributed to the first caller outside polymod."""
    warnings.warn(message, HostMismatchWarning, stacklevel=_user_stacklevel())


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points ``warnings.warn`` at the user's line, past polymod's own frames."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(1), 1  # level 1 is the caller of warnings.warn
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    return level


# -- packages --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Loader:
    """A reader for module directories in another format (registered with :func:`register_loader`).

    Attributes:
        name: the format's name (``peft``, ``adapters``).
        detect: whether a directory is in this format.
        load: ``load(path, host)`` → a polymod :class:`~polymod.modules.contract.Module`.
    """

    name: str
    detect: Callable[[Path], bool]
    load: Callable[[Path, nn.Module | None], Module]


_LOADERS: dict[str, Loader] = {}
_PACKAGE_KINDS: dict[str, Callable[[Path], Any]] = {}


def register_loader(loader: Loader) -> None:
    """Let :func:`load` read directories without ``module.json`` in ``loader``'s format."""
    _LOADERS[loader.name] = loader


def register_package_kind(kind: str, load_package: Callable[[Path], Any]) -> None:
    """Let :func:`load` read packages whose card has ``kind`` (not a module kind), e.g. ``composition``."""
    _PACKAGE_KINDS[kind] = load_package


def detect(path: str | os.PathLike) -> str | None:
    """``polymod`` or a registered format's name for the directory at ``path``; None when none reads it."""
    path = Path(path)
    if (path / CARD_FILE).is_file():
        return "polymod"
    return next((name for name, loader in _LOADERS.items() if loader.detect(path)), None)


def base_model(host: nn.Module | str) -> dict[str, Any]:
    """Which checkpoint a module was made on: its name or path, and for a live host hashes of config and weights.

    ``config_sha256`` hashes the host's config as canonical JSON (without ``_name_or_path`` and
    ``transformers_version``, which name where and how it was saved, not what it is); ``weights_sha256``
    hashes every state-dict tensor's name, dtype, shape and bytes in order. Two hosts with equal
    hashes compute the same function.
    """
    if isinstance(host, str):
        return {"name": host}
    config = getattr(host, "config", None)
    out: dict[str, Any] = {"name": getattr(config, "_name_or_path", None) or type(host).__name__}
    if config is not None and hasattr(config, "to_dict"):
        settings = {k: v for k, v in config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
        out["config_sha256"] = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()
    digest = hashlib.sha256()
    for name, tensor in host.state_dict().items():
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    out["weights_sha256"] = digest.hexdigest()
    return out


_base_model_fn = base_model  # save()'s keyword shadows the function's name


def save(module: Module, path: str | os.PathLike, *, task: str | None = None, description: str | None = None,
         tags: list[str] | None = None, license: str | None = None, language: str | None = None,
         readme: str | None = None, base_model: nn.Module | str | None = None) -> Path:
    """Write ``module`` to directory ``path`` (created; replaced atomically if it exists).

    The keyword arguments fill the saved card (``module.json``) without touching ``module.card``;
    ``None`` keeps what the card already says.

    Args:
        module: the module.
        path: the package directory.
        task: what the module does (``sentiment``, ``nli``, ...).
        description: one paragraph for people browsing the hub.
        tags: search tags (replace the card's).
        license: an SPDX identifier such as ``apache-2.0``.
        language: a language code.
        readme: Markdown written to ``README.md`` next to the card (the hub shows it).
        base_model: the host the module was made on — the model itself (its name or path plus hashes of its
            config and weights are recorded, :func:`base_model`) or just a name — stored as the card's
            ``host.base_model``.

    Returns:
        The directory written.

    Raises:
        ConfigError: ``tags`` is not a list of strings.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    card = module.card.to_dict()
    if tags is not None and (isinstance(tags, str) or not all(isinstance(t, str) for t in tags)):
        raise ConfigError(f"tags must be a list of strings such as ['movies', 'english'], got {tags!r:.80}")
    given = {"task": task, "description": description, "tags": list(tags) if tags is not None else None,
             "license": license, "language": language}
    card.update({k: v for k, v in given.items() if v is not None})
    if base_model is not None:
        card["host"] = {**card.get("host", {}), "base_model": _base_model_fn(base_model)}
    Card.from_dict(card)  # the filled card must still be a valid card
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        save_file(module_tensors(module), str(tmp / WEIGHTS_FILE), metadata=_METADATA)
        (tmp / CARD_FILE).write_text(json.dumps(card, indent=2, sort_keys=True) + "\n")
        if readme is not None:
            (tmp / README_FILE).write_text(readme)
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
    """Load a module saved with :func:`save`, or a directory in a registered format (detected).

    Only ``weights.safetensors`` is read for tensors; the parts are rebuilt from
    the card's kind and config and must match the stored tensors exactly.
    A directory without ``module.json`` goes to the registered loader that
    detects it (PEFT, AdapterHub ``adapters``); a package whose card kind is
    registered with :func:`register_package_kind` (a composition) to its reader.

    Args:
        path: the directory.
        host: the host the module is for. When given, the module is checked
            against it (:func:`check_fits`): an error if it cannot act there, a
            ``HostMismatchWarning`` if it was made on other weights. Foreign
            formats that need the host's shapes (PEFT IA³) read them from it.

    Raises:
        FormatError: missing files, invalid card, unreadable weights, weights that
            do not match the parts the card describes, or a format nobody reads.
        IncompatibleHostError: ``host`` is given and the module does not fit it.
    """
    path = Path(path)
    if path.is_dir() and not (path / CARD_FILE).is_file():
        fmt = detect(path)
        if fmt is None:
            known = ", ".join(sorted(_LOADERS)) or "none registered"
            raise FormatError(f"{path} is not a module polymod can read: expected {CARD_FILE} (polymod) or a "
                              f"directory in one of the registered formats ({known})")
        module = _LOADERS[fmt].load(path, host)
        if host is not None:
            require_fit(module.card, host, f"module at {path}")
        return module
    card = read_card(path)
    if card.kind in _PACKAGE_KINDS:
        return _PACKAGE_KINDS[card.kind](path)
    if host is not None:
        require_fit(card, host, f"module at {path}")
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
    load_tensors(module, tensors, str(weights_file))
    return module


__all__ = ["CARD_FILE", "README_FILE", "WEIGHTS_FILE", "Fit", "Loader", "base_model", "check_fits", "content_hash",
           "detect", "fingerprint", "load", "load_tensors", "module_tensors", "read_card", "register_loader",
           "register_package_kind", "require_fit", "save", "tensor_sha256", "warn_host_mismatch"]
