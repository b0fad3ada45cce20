"""The composition engine: compositions → one op per site.

Every node compiles to ``{site: op(x, y) -> y'}``:

* a module name runs its part: ``y + f_φ(x, y)`` (fused ``add_into`` when the part has one);
* ``Stack`` chains its children's ops at each site;
* ``Mix`` builds a :class:`MixOp` per site: the router's weights (computed once per
  forward for global routers, per site for local ones) and the aggregator's
  combination, through the batched mixers of :mod:`polymod.aggregation.representation`;
* ``Parallel`` and ``Mix(aggregate="output")`` act on the whole host call; they
  compile to no site op and run through :meth:`polymod.Modular.forward`.

:func:`compile_rows` compiles a per-example assignment (``model.route([...])``):
rows are grouped once, per stage of each row's Stack, and every site reuses the
groups — no loop over rows at any site.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from polymod.aggregation import input as calls
from polymod.aggregation import representation as rep
from polymod.compose import Composition, Mix, Parallel, SiteOp, Stack, describe, leaves
from polymod.errors import CompositionError, StateError
from polymod.modules.contract import Module
from polymod.routing.groups import RowGroups
from polymod.sites import Site, is_input_site


@dataclass
class Env:
    """What compilation reads: the library, merged names, host layers and the routing state."""

    library: Mapping[str, Module]
    skip: set[str]
    layers: Mapping[str, nn.Module]
    state: Any


def runs_whole_model(expr: Composition) -> bool:
    """Whether ``expr`` acts on the whole host call (Parallel branches, output ensembles)."""
    if isinstance(expr, Parallel):
        return True
    if isinstance(expr, Mix):
        return expr.aggregate == "output"
    if isinstance(expr, Stack):
        return isinstance(expr.children[-1], Parallel)
    return False


def compile_root(expr: Composition, env: Env) -> dict[str, SiteOp]:
    """Compile the active composition; registers its routers with the routing state."""
    if env.state is not None:
        env.state.start_compile(expr if runs_whole_model(expr) else None)
    if runs_whole_model(expr):
        if isinstance(expr, Mix):  # an output ensemble: its router weighs whole outputs
            env.state.register(expr.router, labels(expr), [], None)
        return {}
    return compile_node(expr, env, inplace=True)


def compile_node(node: Composition, env: Env, inplace: bool = False) -> dict[str, SiteOp]:
    """Compile one node (see the module docstring).

    ``inplace`` marks nodes that own the site output they receive (the root and
    the children of a root Stack): their parts may update it in place
    (``add_into_``). Mix candidates share one output, so they never do.
    """
    if isinstance(node, str):
        if node in env.skip:
            return {}
        return {site: _apply(part, inplace) for site, part in env.library[node].items()}
    if isinstance(node, Stack):
        per_site: dict[str, list[SiteOp]] = {}
        for child in node.children:
            for site, op in compile_node(child, env, inplace).items():
                per_site.setdefault(site, []).append(op)
        return {site: ops[0] if len(ops) == 1 else _chain(ops) for site, ops in per_site.items()}
    if isinstance(node, Mix):
        return compile_mix(node, env)
    raise CompositionError(f"{describe(node)} can only be the root of a composition or the last child of a root Stack")


def _apply(part: nn.Module, inplace: bool = False) -> SiteOp:
    if inplace and hasattr(part, "add_into_"):
        return part.add_into_
    add_into = getattr(part, "add_into", None)
    if add_into is not None:
        return add_into
    return lambda x, y: y + part(x, y)


def _chain(ops: list[SiteOp]) -> SiteOp:
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for op in ops:
            y = op(x, y)
        return y

    return run


def labels(mix: Mix) -> list[str]:
    """Readable candidate names of a Mix: module names as they are, compositions described."""
    return [c if isinstance(c, str) else describe(c) for c in mix.children]


def site_objects(names: Sequence[str], env: Env) -> dict[str, Site]:
    """Site descriptions of every site where the named modules act, in host order."""
    found: dict[str, Site] = {}
    for name in names:
        found.update(env.library[name].sites)
    order = {n: i for i, n in enumerate(env.layers)} if env.layers else {}
    return dict(sorted(found.items(), key=lambda kv: order.get(kv[0], 0)))


def like_tensor(sites: Sequence[str], env: Env) -> torch.Tensor | None:
    """A host tensor at the first site (device and dtype for new router parameters)."""
    for site in sites:
        layer = env.layers.get(site)
        if layer is not None:
            return next(layer.parameters(), None)
    return None


def compile_mix(mix: Mix, env: Env) -> dict[str, SiteOp]:
    """One :class:`MixOp` per site where some candidate acts."""
    merged = [n for n in leaves(mix) if n in env.skip]
    if merged:
        raise StateError(
            f"module {merged[0]!r} is merged into the host weights, so it acts with weight 1 on every input; "
            f"it cannot be a candidate of {describe(mix)}. Call model.unmerge({merged[0]!r}) first."
        )
    if mix.aggregate in ("delta", "factors"):
        from polymod.aggregation.parameter import compile_parameter_mix

        return compile_parameter_mix(mix, env)
    if mix.aggregate == "input":
        from polymod.aggregation.input import compile_input_mix

        return compile_input_mix(mix, env)
    leaf = all(isinstance(c, str) for c in mix.children)
    plans = [compile_node(c, env) for c in mix.children]
    sites = site_objects(leaves(mix), env)
    env.state.register(mix.router, labels(mix), list(sites.values()),
                       like_tensor(list(sites), env))
    ops: dict[str, SiteOp] = {}
    for site in sites:
        present = tuple(i for i, p in enumerate(plans) if site in p)
        if not present:
            continue
        parts = [env.library[mix.children[i]].part(site) for i in present] if leaf else None
        ops[site] = MixOp(site, present, len(mix.children), parts, [plans[i][site] for i in present], mix, env.state)
    return ops


class MixOp:
    """``y' = g({Δyᵢ}, r(x))`` at one site: route, then aggregate representations."""

    def __init__(self, site: str, present: tuple[int, ...], num: int, parts: list[nn.Module] | None,
                 ops: list[SiteOp], mix: Mix, state: Any):
        self.site, self.present, self.parts, self.ops = site, present, parts, ops
        self.full = present == tuple(range(num))
        self.index = torch.tensor(present, dtype=torch.long)
        self.router, self.aggregate, self.state = mix.router, mix.aggregate, state
        self.key = (site, tuple(id(p) for p in parts)) if parts is not None else None
        self.fast = rep.mixer_for(parts) if parts is not None else None
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
            deltas = rep.deltas(self.parts, self.ops, x, y)  # (E', ..., D)
            return self._fuse(x, y, deltas)
        w = self._restrict(self.state.routing(self.router, self.site, x, y))
        if self.aggregate == "mean":
            w = rep.mean_weights(w)
        if self.parts is not None:
            return rep.mix(self.parts, x, y, w, self.key, self.state.cache, self.fast)
        return rep.mix_ops(self.ops, x, y, w)

    def _fuse(self, x: Any, y: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        w = self.state.routing(self.router, self.site, x, y, outputs=y.unsqueeze(0) + deltas)
        if self.aggregate == "attention":
            return self.router.fuse(self.site, y.unsqueeze(0) + deltas, w)
        return y + rep.weighted_sum(deltas, w)

    def _call_site(self, module: nn.Module, call: dict) -> dict:
        """At an input site: per-row selection of calls, or a weighted sum of the changed argument."""
        fns = [p.add_into for p in self.parts] if self.parts is not None else self.ops
        if not self.router.local:
            w = self.state.routing(self.router, self.site, None, calls.probe(call))
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
        w = self._restrict(self.state.routing(self.router, self.site, z, z))
        if isinstance(w, RowGroups):
            w = w.weights(z.dtype)  # (B, E')
        if self.aggregate == "mean":
            w = rep.mean_weights(w)
        out[key] = z + rep.weighted_sum(deltas, w)
        return out


# -- per-example rows (model.route) ---------------------------------------------------------


def row_chain(row: Composition | None, env: Env) -> list[str]:
    """The modules a row applies, in Stack order (merged modules excluded)."""
    if row is None:
        return []
    if isinstance(row, str):
        return [] if row in env.skip else [row]
    if isinstance(row, Stack):
        return [n for c in row.children for n in row_chain(c, env)]
    raise CompositionError(
        f"route() rows take a module name, a Stack of module names or None, got {describe(row)}; "
        "to route inside a Mix per example, use Mix(..., router=ExampleRouter()) with model.route(names=[...])"
    )


def compile_rows(rows: Sequence[Composition | None], env: Env, device: torch.device | None) -> dict[str, SiteOp]:
    """Compile one composition per row into one op per site.

    Each site runs the rows' Stacks stage by stage; a stage is one
    :class:`RowGroups` (which module each row applies there), built once per
    distinct stage and shared by every site with the same modules.
    """
    chains = [row_chain(r, env) for r in rows]
    order = {n: i for i, n in enumerate(env.library)}
    used = list(dict.fromkeys(n for c in chains for n in c))
    sites_of = {n: env.state.parts_of(n, env.library[n]) for n in used}
    groups: dict[tuple, tuple[list[str], RowGroups]] = {}
    stages_of: dict[tuple[str, ...], list[tuple[list[str], RowGroups]]] = {}
    ops: dict[str, SiteOp] = {}
    for site in site_objects(used, env):
        here = tuple(n for n in used if site in sites_of[n])
        if here not in stages_of:
            seqs = [[n for n in c if n in here] for c in chains]
            stages = []
            for j in range(max(len(s) for s in seqs)):
                key = tuple(s[j] if j < len(s) else None for s in seqs)
                if key not in groups:
                    names = sorted({n for n in key if n is not None}, key=order.get)  # stable: reuses stacks
                    pos = {n: i for i, n in enumerate(names)}
                    groups[key] = (names, RowGroups.from_list([pos.get(n, -1) for n in key], len(names), device))
                stages.append(groups[key])
            stages_of[here] = stages
        stages = [([sites_of[n][site] for n in names], g) for names, g in stages_of[here]]
        ops[site] = (InputRowsOp if is_input_site(site) else RowsOp)(site, stages, env.state)
    return ops


class RowsOp:
    """A per-example site op: each stage applies one module per row, batched."""

    def __init__(self, site: str, stages: list[tuple[list[nn.Module], RowGroups]], state: Any):
        self.site = site
        self.stages = [(parts, g, (site, tuple(id(p) for p in parts)), rep.mixer_for(parts)) for parts, g in stages]
        self.cache = state.cache

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for parts, groups, key, fast in self.stages:
            y = rep.mix(parts, x, y, groups, key, self.cache, fast)
        return y


class InputRowsOp(RowsOp):
    """A per-example op at an input site: each stage selects each row's call from its module's."""

    def __call__(self, module: nn.Module, call: dict) -> dict:
        for parts, groups, _, _ in self.stages:
            call = calls.mix_rows([p.add_into for p in parts], module, call, groups)
        return call
