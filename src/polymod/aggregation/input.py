"""Aggregation at input sites: calls instead of tensors; input aggregation by concatenation.

At an *input site* (:mod:`polymod.inputs`) a part changes the keyword arguments
of a call — ``add_into(module, call, weight) -> call'`` — instead of adding Δy
to a tensor. Three things happen here:

* **input aggregation** (survey §5.3): ``Mix(["p1", "p2"], aggregate="input")``
  concatenates the candidates' virtual tokens, f_θ([P₁; P₂; x]), in candidate
  order, each scaled by its weight from a batch-level router. For concatenation
  the natural default is weight 1 per prompt, so ``Static()`` without explicit
  weights inserts each prompt unscaled.
* **per-row selection** (``model.route``, one-candidate-per-row routers): each
  active candidate transforms the whole call once — a loop over candidates,
  never rows — and each row's tensors are taken from its candidate's result.
  Key/value caches written by prefixes are merged the same way, row by row.
  This needs every row's result to have the same shape (prompts and prefixes of
  one length on every row), which is checked with an error that says so.
* **representation aggregation at input sites** (adapters placed at a norm's
  input): the candidates change one tensor argument z of the call; the engine
  combines z + Σᵢ wᵢ (zᵢ − z) like at any other site.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.cache_utils import Cache

from polymod import inputs
from polymod.aggregation.base import Env, SiteOp, head_routing_refusal, leaf_names, site_objects
from polymod.compose import Mix
from polymod.errors import CompositionError, StateError
from polymod.modules.contract import Module
from polymod.routing.fixed import Static
from polymod.routing.groups import RowGroups

CallOp = Callable[[nn.Module, dict], dict]


def only_input_sites(module: Module) -> bool:
    """Whether a module acts only at input sites (prompt, prefix)."""
    return all(s.kind == "input" for s in module.sites.values())


class Input:
    """``input``: concatenate the candidates' prompts/prefixes (see the module docstring)."""

    name: ClassVar[str] = "input"
    whole_call: ClassVar[bool] = False

    def check(self, mix: Mix, modules: Sequence[Module], root: bool) -> str | None:
        """Refuse composed candidates, kinds that act inside the host, and per-site or per-token routers."""
        if leaf_names(mix) is None:
            return "aggregate='input' concatenates the candidates' prompts, so candidates must be module names"
        bad = sorted({m.kind for m in modules if not only_input_sites(m)})
        if bad:
            return (f"aggregate='input' concatenates prompts/prefixes; candidates of kind {bad} act inside the host, "
                    "not (only) on its input — use aggregate='sum' for them")
        router = mix.router
        if router.reads_hidden or router.local or router.level == "token":
            return (f"aggregate='input' needs one weight per candidate for the batch or one candidate per row; "
                    f"{router} gives weights per site or token")
        return head_routing_refusal(mix, allowed=False)

    def compile(self, mix: Mix, env: Env) -> dict[str, SiteOp]:
        """One :class:`ConcatOp` per input site of the candidates."""
        names = list(mix.children)
        modules = [env.library[n] for n in names]
        sites = site_objects(names, env)
        env.routing.register(mix.router, names, list(sites.values()), None)
        ops: dict[str, SiteOp] = {}
        for site in sites:
            present = tuple(i for i, m in enumerate(modules) if site in m.sites)
            ops[site] = ConcatOp(site, present, len(names), [modules[i].part(site) for i in present], mix, env)
        return ops


def probe(call: dict[str, Any]) -> torch.Tensor:
    """An empty (B, T, 0) tensor standing for the call's tokens, for global routers."""
    for value in call.values():
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return value.new_empty(*value.shape[:2], 0, dtype=torch.float32)
    batch, length, device = inputs.tokens(call)
    return torch.empty(batch, length, 0, device=device)


class ConcatOp:
    """Concatenate (or select per row) the candidates' prompts at one input site."""

    def __init__(self, site: str, present: tuple[int, ...], num: int, parts: list[nn.Module], mix: Mix, env: Env):
        self.site, self.present, self.full, self.parts = site, present, present == tuple(range(num)), parts
        self.router, self.routing = mix.router, env.routing
        self.unscaled = isinstance(mix.router, Static) and mix.router.fixed is None

    def __call__(self, module: nn.Module, call: dict[str, Any]) -> dict[str, Any]:
        w = self.routing.routing(self.router, self.site, None, probe(call))
        if isinstance(w, RowGroups):
            return mix_rows([p.add_into for p in self.parts], module, call, w.restrict(self.present))
        if w.dim() != 2 or w.shape[0] != 1:
            raise StateError(f"input aggregation takes one weight per candidate for the batch; {self.router} gave "
                             f"weights of shape {tuple(w.shape)}")
        weights = [1.0 if self.unscaled else float(w[0, i]) for i in self.present]
        for part, weight in reversed(list(zip(self.parts, weights))):  # the last inserted ends up first
            if weight != 0.0:
                call = part.add_into(module, call, weight)
        return call


def _is_cache(value: Any) -> bool:
    return isinstance(value, Cache)


def _own(cache: Any) -> Any:
    return getattr(cache, "self_attention_cache", cache)  # EncoderDecoderCache: its self-attention half


def _fresh(call: dict[str, Any]) -> dict[str, Any]:
    """A copy of the call; on a first step its caches are private copies too (prefixes write into them)."""
    if not inputs.is_first_step(call):
        return dict(call)
    return {k: copy.deepcopy(v) if _is_cache(v) else v for k, v in call.items()}


def mix_rows(fns: Sequence[CallOp], module: nn.Module, call: dict[str, Any], groups: RowGroups) -> dict[str, Any]:
    """Each row's call as its own candidate (``fn(module, call) -> call'``) would make it; host-only rows unchanged.

    Raises:
        StateError: candidates change the call into tensors of different shapes
            (e.g. prompts of different lengths), which one batch cannot hold.
    """
    groups.check_rows(probe(call).shape[0], f"input site of {type(module).__name__}")
    if groups.single is not None:
        return fns[groups.single](module, call)
    results = [fns[c](module, _fresh(call)) for c in groups.active]
    slot = torch.full((groups.size,), len(results), dtype=torch.long, device=groups.index.device)  # (B,)
    for i, rows in enumerate(groups.rows):
        slot[rows] = i
    if groups.none_rows.numel():
        results.append(_fresh(call))
    pick = (slot, torch.arange(groups.size, device=slot.device))
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for r in results for k in r):
        values = [r.get(key) for r in results]
        if all(v is values[0] for v in values):
            out[key] = values[0]
        elif all(_is_cache(v) for v in values):
            out[key] = _merge_caches(call.get(key), values, pick)
        else:
            out[key] = _select(key, values, pick, groups.size)
    return out


def _select(key: str, values: list[Any], pick: tuple[torch.Tensor, torch.Tensor], rows: int) -> torch.Tensor:
    shapes = {tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__ for v in values}
    if len(shapes) != 1 or not all(isinstance(v, torch.Tensor) and v.shape[:1] == (rows,) for v in values):
        raise StateError(
            f"rows of one batch use input modules that change the call's {key!r} differently "
            f"({', '.join(sorted(map(str, shapes)))}); per-example input composition needs prompts/prefixes of one "
            "length on every row (and one on every row). Group rows by prompt length, or give every row one"
        )
    return torch.stack(values)[pick]  # (S, B, …) → (B, …): each row from its candidate's call


def _merge_caches(original: Any, caches: list[Any], pick: tuple[torch.Tensor, torch.Tensor]) -> Any:
    """One cache whose row b holds the keys/values that row b's candidate wrote."""
    target = original if original is not None else caches[0]
    own = _own(target)
    added = inputs.virtual_entries(caches[0]) - inputs.virtual_entries(original)
    for layer in range(len(_own(caches[0]).layers)):
        keys = [_own(c).layers[layer].keys for c in caches]
        values = [_own(c).layers[layer].values for c in caches]
        if len({tuple(k.shape) for k in keys}) != 1:
            raise StateError("rows of one batch use prefixes of different lengths; per-example prefixes need one "
                             "length on every row (and a prefix on every row)")
        k, v = torch.stack(keys)[pick], torch.stack(values)[pick]  # (B, H_kv, n, d)
        if layer < len(own.layers) and own.layers[layer].is_initialized and own.layers[layer].keys.numel():
            own.layers[layer].keys, own.layers[layer].values = k, v
        else:
            own.update(k, v, layer)
    if target is not caches[0] and added:
        inputs.mark_virtual(target, added)
    return target


# -- representation aggregation at input sites ----------------------------------------------


def call_deltas(fns: Sequence[CallOp], module: nn.Module,
                call: dict[str, Any]) -> tuple[str, torch.Tensor, torch.Tensor] | None:
    """The tensor argument z the candidates change and their changes: (key, z, Δ (E, …, D)); None if unchanged.

    Raises:
        CompositionError: the candidates change the call's shape or several arguments
            (prompts, prefixes), which a weighted sum cannot combine.
    """
    results = [fn(module, _fresh(call)) for fn in fns]
    changed = sorted({k for r in results for k, v in r.items() if v is not call.get(k)})
    if not changed:  # e.g. a hypernetwork's anchor site: nothing to combine
        return None
    if len(changed) != 1 or not all(isinstance(r[changed[0]], torch.Tensor) for r in results) or \
            any(r[changed[0]].shape != call[changed[0]].shape for r in results):
        raise CompositionError(f"these input modules change the call's {', '.join(changed) or 'nothing'} in ways a "
                               "weighted sum cannot combine (prompts and prefixes change its length); "
                               "use Mix(..., aggregate='input') to concatenate them")
    key = changed[0]
    z = call[key]
    return key, z, torch.stack([r[key] - z for r in results])  # (E, …, D)
