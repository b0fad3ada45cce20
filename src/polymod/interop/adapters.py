"""AdapterHub ``adapters`` saved adapters, read as polymod modules.

``model.save_adapter(dir, name, use_safetensors=True)`` writes
``adapter_config.json`` (``{"config": {"architecture": ...}, "model_class", "name", ...}``)
and ``adapter.safetensors`` with keys ``<qualified layer>.loras.<name>.lora_A``
(LoRA) or ``<layer>.adapters.<name>.adapter_down.0.weight`` (bottleneck). Its
default, ``pytorch_adapter.bin``, is a pickle: polymod refuses it and says how
to re-save. The layer names are those of the model the adapter was added to,
which are polymod's site names for that host class.

Supported: ``lora`` (``composition_mode="add"``, no gating, no DoRA/VeRA) as
:class:`~polymod.modules.lora.LoRA` with s = α/r. Bottleneck adapters
(``SeqBnConfig``, ``DoubleSeqBnConfig``, ``ParBnConfig``) map to polymod's
``adapter`` kind when that kind is registered (see :func:`read_adapters`).
Configs are read by allow-list (:mod:`polymod.interop.adapters_options`): every
key understood, or refused by name unless at its default.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from polymod.card import Card, Lineage
from polymod.errors import FormatError
from polymod.format import fingerprint
from polymod.interop import adapters_options as options
from polymod.interop.bottleneck import read_bottleneck
from polymod.interop.options import check
from polymod.interop.peft import exact
from polymod.modules.contract import Module, ModuleSpec, spec_to_dict
from polymod.modules.lora import LoRA
from polymod.sites import Site

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter.safetensors"
PICKLE_FILE = "pytorch_adapter.bin"


def is_adapters_dir(path: Path) -> bool:
    """Whether ``path`` looks like a directory written by ``adapters``' ``save_adapter``."""
    if not (path / CONFIG_FILE).is_file():
        return False
    try:
        data = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("config"), dict) and "name" in data


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    meta = json.loads((path / CONFIG_FILE).read_text())
    if not (path / WEIGHTS_FILE).is_file():
        if (path / PICKLE_FILE).is_file():
            raise FormatError(f"{path} holds only {PICKLE_FILE}, a pickle file; polymod never loads pickle. Re-save "
                              "it with model.save_adapter(dir, name, use_safetensors=True)")
        raise FormatError(f"{path} has no {WEIGHTS_FILE}")
    try:
        return meta, load_file(str(path / WEIGHTS_FILE))
    except Exception as exc:  # safetensors raises several types for malformed files
        raise FormatError(f"{path / WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None


def _card(kind: str, spec: ModuleSpec, sites: list[Site], host: nn.Module | None, meta: dict[str, Any]) -> Card:
    if host is not None:
        geometry = fingerprint(host, {s.name: s for s in sites})
    else:
        geometry = {"architecture": meta.get("model_class"), "model_type": meta.get("model_type"),
                    "sites": {s.name: {"kind": s.kind, "in": s.in_features, "out": s.out_features} for s in sites}}
    recipe = {"method": "import", "format": "adapters", "architecture": meta["config"].get("architecture"),
              "source_version": meta.get("version")}
    return Card(kind=kind, config=spec_to_dict(spec), host=geometry, lineage=Lineage(recipe=recipe),
                name=meta.get("name"), description=f"imported from an AdapterHub adapters {recipe['architecture']} "
                f"adapter named {meta.get('name')!r}")


def _lora(meta: dict[str, Any], tensors: dict[str, torch.Tensor], host: nn.Module | None) -> Module:
    config, name = meta["config"], meta["name"]
    check(config, options.LORA, "adapters LoRAConfig")
    marker = f".loras.{name}."
    per_site: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if marker not in key:
            raise FormatError(f"adapters tensor {key!r} is not a LoRA tensor of adapter {name!r}")
        site, _, leaf = key.partition(marker)
        per_site.setdefault(site, {})[leaf] = value
    rank = int(config["r"])
    spec = LoRA(rank=rank, alpha=float(config.get("alpha", rank)), dropout=float(config.get("dropout", 0.0)),
                sites=exact(sorted(per_site)))
    sites, parts = [], []
    for site_name, t in per_site.items():
        a, b = t.get("lora_A"), t.get("lora_B")
        if a is None or b is None or a.shape[0] != rank or b.shape[1] != rank:
            raise FormatError(f"adapters LoRA tensors at {site_name} are incomplete or not of rank {rank}")
        site = Site(site_name, "linear", a.shape[1], b.shape[0])
        part = spec.build_part(site, None)
        part.load_state_dict({"A": a, "B": b})
        sites.append(site)
        parts.append(part)
    return Module(spec, sites, parts, card=_card("lora", spec, sites, host, meta))


def read_adapters(path: str | os.PathLike, host: nn.Module | None = None) -> Module:
    """Read a directory saved by ``adapters``' ``save_adapter(..., use_safetensors=True)``.

    Args:
        path: the directory.
        host: the host it belongs to (gives the card a full host fingerprint; needed by
            bottleneck adapters to resolve their sites).

    Raises:
        FormatError: a pickle-only directory, an unsupported architecture or option.
    """
    path = Path(path)
    meta, tensors = _read(path)
    check(meta, options.META, "adapters saved adapter")
    architecture = meta["config"].get("architecture")
    if architecture == "lora":
        return _lora(meta, tensors, host)
    if architecture in (None, "bottleneck"):
        return read_bottleneck(meta, tensors, host, _card)
    raise FormatError(f"adapters architecture {architecture!r} is not supported; polymod reads 'lora' and "
                      "bottleneck adapters")
