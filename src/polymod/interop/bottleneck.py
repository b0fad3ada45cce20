"""AdapterHub bottleneck adapters (``SeqBnConfig``, ``DoubleSeqBnConfig``, ``ParBnConfig``) as polymod ``adapter``s.

``adapters`` stores a bottleneck adapter under the sub-module that owns it —
BERT's ``attention.output`` (after attention) and ``output`` (after the FFN) —
as ``<owner>.adapters.<name>.adapter_down.0.{weight,bias}``,
``adapter_up.{weight,bias}`` and optional ``adapter_norm_before/after``. polymod's
:class:`~polymod.modules.adapter.Adapter` places the same computation at a site
inside that owner (``attention.output.dense``, ``output.LayerNorm``'s input,
``output``'s input), so each polymod site maps to the owner that contains it.

The three configurations are recognised by their structural flags; the config
is read by allow-list (:data:`polymod.interop.adapters_options.BOTTLENECK`), so
anything else (PHM layers, gating, cross-attention adapters, stochastic depth,
learned scaling, residual variants, unknown keys) is refused with the key named.
The host is needed: an adapter's sites depend on the host's architecture family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from polymod.errors import ConfigError, FormatError
from polymod.interop.adapters_options import BOTTLENECK
from polymod.interop.options import check
from polymod.modular import build_module
from polymod.modules.adapter import Adapter
from polymod.modules.contract import Module
from polymod.sites import INPUT

# placement -> the structural flags adapters' config must have for polymod's placement to be the same maths
_PLACEMENTS = {
    "pfeiffer": {"mh_adapter": False, "output_adapter": True, "is_parallel": False, "original_ln_before": True,
                 "original_ln_after": True, "residual_before_ln": True},
    "houlsby": {"mh_adapter": True, "output_adapter": True, "is_parallel": False, "original_ln_before": False,
                "original_ln_after": True, "residual_before_ln": True},
    "parallel": {"mh_adapter": False, "output_adapter": True, "is_parallel": True, "original_ln_before": False,
                 "original_ln_after": True, "residual_before_ln": True},
}
_ACTIVATIONS = {"relu": "relu", "swish": "silu", "silu": "silu", "gelu": "gelu", "gelu_new": "gelu_tanh",
                "gelu_orig": "gelu", "tanh": "tanh"}
_TENSORS = {"adapter_down.0.weight": "down.weight", "adapter_down.0.bias": "down.bias",
            "adapter_up.weight": "up.weight", "adapter_up.bias": "up.bias",
            "adapter_norm_before.weight": "norm_before.weight", "adapter_norm_before.bias": "norm_before.bias",
            "adapter_norm_after.weight": "norm_after.weight", "adapter_norm_after.bias": "norm_after.bias"}


def _placement(config: dict[str, Any]) -> str:
    check(config, BOTTLENECK, "adapters bottleneck config")
    for placement, flags in _PLACEMENTS.items():
        if all(config.get(k) == v for k, v in flags.items()):
            return placement
    shown = {k: config.get(k) for k in _PLACEMENTS["pfeiffer"]}
    raise FormatError(f"adapters bottleneck flags {shown} match none of SeqBnConfig (pfeiffer), DoubleSeqBnConfig "
                      "(houlsby) or ParBnConfig (parallel), the configurations polymod reproduces")


def _owner(site: str) -> str:
    """The sub-module ``adapters`` hangs the adapter acting at ``site`` on."""

    name = site.removesuffix("." + INPUT)
    head, _, leaf = name.rpartition(".")
    return head if leaf in ("dense", "LayerNorm") and head else name


def read_bottleneck(meta: dict[str, Any], tensors: dict[str, torch.Tensor], host: nn.Module | None,
                    card: Callable[..., Any]) -> Module:
    """Build a polymod ``adapter`` module from an ``adapters`` bottleneck adapter's config and tensors.

    Raises:
        ConfigError: no host was given.
        FormatError: unsupported options, or tensors that do not map onto the host's sites.
    """

    if host is None:
        raise ConfigError("reading an adapters bottleneck adapter needs the host (host=...): its sites depend on "
                          "the host's architecture")
    config, name = meta["config"], meta["name"]
    scaling, reduction = config.get("scaling", 1.0), config.get("reduction_factor")
    if not isinstance(scaling, (int, float)) or not isinstance(reduction, (int, float)):
        raise FormatError(f"adapters scaling={scaling!r} / reduction_factor={reduction!r} must be numbers "
                          "(learned scaling and per-layer reductions are not represented)")
    if config.get("non_linearity") not in _ACTIVATIONS:
        raise FormatError(f"adapters non_linearity {config.get('non_linearity')!r} is not one polymod has")
    spec = Adapter(placement=_placement(config), reduction=float(reduction),
                   activation=_ACTIVATIONS[config["non_linearity"]], scaling=float(scaling),
                   norm_before=bool(config.get("ln_before")), norm_after=bool(config.get("ln_after")),
                   dropout=float(config.get("dropout", 0.0)))
    marker = f".adapters.{name}."
    by_owner: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        owner, _, leaf = key.partition(marker)
        if not leaf or leaf not in _TENSORS:
            raise FormatError(f"adapters tensor {key!r} is not a bottleneck tensor of adapter {name!r}")
        by_owner.setdefault(owner, {})[_TENSORS[leaf]] = value
    module = build_module(host, spec)
    kept = [s for s in module.sites if _owner(s) in by_owner]  # adapters' leave_out drops whole layers
    if {_owner(s) for s in kept} != set(by_owner):
        missing = sorted(set(by_owner) - {_owner(s) for s in kept})
        raise FormatError(f"adapters tensors under {missing[:3]} have no matching {spec.placement} site on this "
                          f"{type(host).__name__}; load it onto the model class it was saved from "
                          f"({meta.get('model_class')})")
    parts = [module.part(s) for s in kept]
    for site, part in zip(kept, parts):
        part.load_state_dict(by_owner[_owner(site)])
    sites = [module.sites[s] for s in kept]
    return Module(spec, sites, parts, card=card("adapter", spec, sites, host, meta))
