"""Representation aggregation: y' = g({Δyᵢ}, r(x)) at each site, batched per module kind.

The survey's representation-level aggregation (§5.2) combines the active
modules' outputs at a site. Three registered aggregators share one site op:

* ``sum`` (the default): y' = y + Σᵢ wᵢ Δyᵢ with the router's weights;
* ``mean``: the unweighted mean over the candidates the router selected
  (non-zero weight), y' = y + (1/k) Σ_{i selected} Δyᵢ;
* ``attention``: AdapterFusion (Pfeiffer et al., 2021), y' = Σᵢ sᵢ V oᵢ over the
  candidates' outputs oᵢ = y + Δyᵢ with attention scores sᵢ from
  :class:`~polymod.routing.AttentionFusion` (the only router it takes).

Candidates may be module names (their parts are mixed by a batched mixer,
:mod:`polymod.aggregation.mixers`) or compositions (their compiled ops are
mixed by the generic mixer). At input sites (adapters placed at a norm's input)
the candidates change one tensor argument z of the call, combined the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from polymod.aggregation import input as calls
from polymod.aggregation import weighted
from polymod.aggregation.base import Env, SiteOp, head_routing_refusal, labels, leaf_names, like_tensor, site_objects
from polymod.aggregation.mixers import mix, mixer_for
from polymod.compose import Mix, leaves
from polymod.modules.contract import Module
from polymod.routing.attention import AttentionFusion
from polymod.routing.base import ReadsModules
from polymod.routing.groups import RowGroups
from polymod.sites import is_input_site


class Representation:
    """``sum``, ``mean`` or ``attention`` (see the module docstring)."""

    whole_call: ClassVar[bool] = False

    def __init__(self, name: str):
        self.name = name

    def check(self, mix: Mix, modules: Sequence[Module], root: bool) -> str | None:
        """Refuse multi-head routing, attention without AttentionFusion, and mean over output-reading routers."""
        refusal = head_routing_refusal(mix, allowed=False)
        if refusal:
            return refusal
        if self.name == "attention" and not isinstance(mix.router, AttentionFusion):
            return (f"aggregate='attention' fuses module outputs with AttentionFusion's value map; "
                    f"use router=AttentionFusion(), got {mix.router}")
        if mix.router.needs_outputs and self.name == "mean":
            return f"{mix.router} weighs the candidates' outputs; use aggregate='attention' or 'sum'"
        return None

    def compile(self, mix: Mix, env: Env) -> dict[str, SiteOp]:
        """One :class:`MixOp` per site where some candidate acts."""
        names = leaf_names(mix)
        plans = [env.compile_child(c) for c in mix.children]
        sites = site_objects(leaves(mix), env)
        env.routing.register(mix.router, labels(mix), list(sites.values()), like_tensor(list(sites), env))
        ops: dict[str, SiteOp] = {}
        for site, info in sites.items():
            present = tuple(i for i, p in enumerate(plans) if site in p)
            if not present:
                continue
            if isinstance(mix.router, ReadsModules) and names is not None:  # library routers read the weights
                mix.router.bind_modules(info, names, [env.library[n].part(site) if site in env.library[n].sites
                                                      else None for n in names], env.layers.get(site))
            parts = [env.library[names[i]].part(site) for i in present] if names is not None else None
            ops[site] = MixOp(site, present, len(mix.children), parts, [plans[i][site] for i in present], mix,
                              self.name, env)
        return ops


class MixOp:
    """``y' = g({Δyᵢ}, r(x))`` at one site: route, then aggregate representations."""

    def __init__(self, site: str, present: tuple[int, ...], num: int, parts: list[nn.Module] | None,
                 ops: list[SiteOp], mix: Mix, aggregate: str, env: Env):
        self.site, self.present, self.parts, self.ops = site, present, parts, ops
        self.full = present == tuple(range(num))
        self.index = torch.tensor(present, dtype=torch.long)
        self.router, self.aggregate = mix.router, aggregate
        self.routing, self.cache = env.routing, env.cache
        self.key = (site, tuple(id(p) for p in parts)) if parts is not None else None
        self.fast = mixer_for(parts) if parts is not None else None
        self.input_site = is_input_site(site)

    def _restrict(self, w: Any) -> Any:
        if self.full:
            return w
        if isinstance(w, RowGroups):
            return w.restrict(self.present)
        return w.index_select(-1, self.index.to(w.device))  # (..., E') present candidates only

    def __call__(self, x: Any, y: Any) -> Any:
        if self.input_site:
            return self._call_site(x, y)
        if self.router.needs_outputs:  # attention fusion: weights from the candidates' outputs
            deltas = weighted.deltas(self.parts, self.ops, x, y)  # (E', ..., D)
            return self._fuse(x, y, deltas)
        w = self._restrict(self.routing.routing(self.router, self.site, x, y))
        if self.aggregate == "mean":
            w = weighted.mean_weights(w)
        if self.parts is not None:
            return mix(self.parts, x, y, w, self.key, self.cache, self.fast)
        return weighted.mix_ops(self.ops, x, y, w)

    def _fuse(self, x: Any, y: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        w = self.routing.routing(self.router, self.site, x, y, outputs=y.unsqueeze(0) + deltas)
        if self.aggregate == "attention":
            return self.router.fuse(self.site, y.unsqueeze(0) + deltas, w)
        return y + weighted.weighted_sum(deltas, w)

    def _call_site(self, module: nn.Module, call: dict) -> dict:
        """At an input site: per-row selection of calls, or a weighted sum of the changed argument."""
        fns = [p.add_into for p in self.parts] if self.parts is not None else self.ops  # input parts' call ops
        if not self.router.local:
            w = self.routing.routing(self.router, self.site, None, calls.probe(call))
            if isinstance(w, RowGroups):
                return calls.mix_rows(fns, module, call, self._restrict(w))
        changed = calls.call_deltas(fns, module, call)
        if changed is None:
            return call
        key, z, deltas = changed  # z (…, D), Δ (E', …, D)
        out = dict(call)
        if self.router.needs_outputs:
            out[key] = self._fuse(z, z, deltas)
            return out
        w = self._restrict(self.routing.routing(self.router, self.site, z, z))
        if isinstance(w, RowGroups):
            w = w.weights(z.dtype)  # (B, E')
        if self.aggregate == "mean":
            w = weighted.mean_weights(w)
        out[key] = z + weighted.weighted_sum(deltas, w)
        return out
