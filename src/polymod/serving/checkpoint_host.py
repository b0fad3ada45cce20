"""A served base model as its files: a module's host fingerprint checked without building the model.

vLLM loads the host itself; the resolver that hands it modules must not hold a
second copy of the weights just to compare fingerprints. :class:`CheckpointHost`
reads ``config.json`` and the safetensors index, and reads one tensor at a time
(memory-mapped) when a card records a site's weight hash; each hash is computed
once per (tensor, dtype).

The verdict follows :func:`polymod.format.check_fits`: a missing site, another
geometry or another ``model_type`` is an error; other weights at fitting sites
(another checkpoint of the same architecture) is a warning.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from polymod.card import Card
from polymod.errors import ConfigError
from polymod.format import Fit, recorded_site, tensor_sha256
from polymod.sites import Site


class CheckpointHost:
    """The host checkpoint in a directory (``config.json`` + ``*.safetensors``), read lazily.

    Args:
        path: the model directory vLLM serves.

    Raises:
        ConfigError: no config.json, or no safetensors weights.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.config: dict[str, Any] = json.loads((self.path / "config.json").read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path} is not a model directory with a readable config.json ({exc}); give the "
                              "directory of the checkpoint vLLM serves") from exc
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.path / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            self.files = {}
            for file in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(file), "pt") as f:
                    self.files.update({k: file for k in f.keys()})
        if not self.files:
            raise ConfigError(f"{self.path} holds no safetensors weights; the vLLM engine checks modules against the "
                              "served checkpoint's tensors (save the host with save_pretrained)")
        self.model_type = self.config.get("model_type")
        archs = self.config.get("architectures") or []
        self.architecture = archs[0] if archs else None
        self._hashes: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def shape(self, key: str) -> list[int] | None:
        """The shape of tensor ``key``, or None when the checkpoint has no such tensor."""
        file = self.files.get(key)
        if file is None:
            return None
        with safe_open(str(file), "pt") as f:
            return list(f.get_slice(key).get_shape())

    def sha256(self, key: str, dtype: str) -> str:
        """sha256 of tensor ``key`` cast to ``dtype`` (as a host loaded in that dtype holds it)."""
        with self._lock:
            done = self._hashes.get((key, dtype))
        if done is None:
            with safe_open(str(self.files[key]), "pt") as f:
                tensor = f.get_tensor(key)
            done = tensor_sha256(tensor.to(getattr(torch, dtype)))
            with self._lock:
                self._hashes[(key, dtype)] = done
        return done

    def check(self, card: Card, sites: dict[str, Site] | None = None) -> Fit:
        """Compare a module's recorded host with this checkpoint (see the module docstring).

        Args:
            card: the module's card.
            sites: the module's own site descriptions, for sites the card records no geometry of.
        """
        recorded = card.host or {}
        fit = Fit()
        missing, differing = [], []
        for name in card.sites:
            entry = recorded_site(card, name, sites)
            key = f"{name}.weight"
            have = self.shape(key)
            if have is None:
                missing.append(name)
                continue
            want = _layout(entry)
            if want is not None and want != have:
                fit.errors.append(f"site {name}: module expects a {entry.get('kind')} {entry.get('in')}->"
                                  f"{entry.get('out')}, the served checkpoint's {key} is {have}")
                continue
            weight = entry.get("weight") or {}
            if weight.get("sha256") and list(weight.get("shape", ())) == have:
                if self.sha256(key, weight.get("dtype", "float32")) != weight["sha256"]:
                    differing.append(name)
        if missing:
            fit.errors.insert(0, f"{len(missing)} of {len(card.sites)} sites are missing from the served "
                                 f"checkpoint (first: {missing[0]}.weight)")
        model_type = recorded.get("model_type")
        if model_type and self.model_type and model_type != self.model_type:
            fit.errors.append(f"model_type: module made for {model_type}, the served model is {self.model_type}")
        if differing:
            fit.warnings.append(f"host weights differ at {len(differing)} of {len(card.sites)} sites (first: "
                                f"{differing[0]}) from those the module was made on: another checkpoint of the "
                                "same architecture")
        return fit


def _layout(entry: dict[str, Any]) -> list[int] | None:
    """The weight shape a site's (kind, in, out) means in a checkpoint (Linear: [out, in])."""
    kind, d_in, d_out = entry.get("kind"), entry.get("in"), entry.get("out")
    if d_in is None or d_out is None:
        return None
    return [d_out, d_in] if kind == "linear" else [d_in, d_out]


__all__ = ["CheckpointHost"]
