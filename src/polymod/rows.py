"""Per-row routing and whole-call passes: one batch, a different composition per row.

``model.route([...])`` gives each row of a batch its own composition (a module
name, a Stack of names, or None for the host alone). :func:`compile_rows` turns
such an assignment into one op per site: each site runs the rows' Stacks stage
by stage, and each stage is one :class:`~polymod.routing.groups.RowGroups`
(which module each row applies there), built once per distinct stage and shared
by every site with the same modules — no loop over rows at any site. The batched
mixers (:mod:`polymod.aggregation.mixers`) then apply one module per row in a
few GEMMs. :class:`RowPlans` keeps the last few compiled assignments; it belongs
to the model, like the rest of the per-call state.

Compositions that act on the whole host call run here too, as one replicated
pass: ``Parallel(a, b)`` replicates the batch once per branch (P·B rows), routes
row block i to branch i and splits the output back into P outputs;
``Mix(..., aggregate="output")`` does the same over its candidates and ensembles
their logits with the router's weights (:mod:`polymod.aggregation.output`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import torch
from torch import nn

from polymod.aggregation.base import Env, SiteOp, site_objects
from polymod.aggregation.cache import StackCache
from polymod.aggregation.input import mix_rows
from polymod.aggregation.mixers import mix, mixer_for
from polymod.aggregation.output import branches, combine, logits_of
from polymod.compose import Composition, Mix, Stack, describe
from polymod.errors import CompositionError, ConfigError, StateError
from polymod.routing.groups import RowGroups
from polymod.routing.state import RoutingState
from polymod.sites import is_input_site


class Routable(Protocol):
    """What a whole-call pass needs of a model: its host, routing state and ``route``."""

    host: nn.Module
    routing: RoutingState

    def route(self, rows: Sequence[Any] | None = None) -> AbstractContextManager[None]:
        """Per-row routing for a ``with`` block (see :meth:`polymod.Modular.route`)."""


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


def compile_rows(rows: Sequence[Composition | None], env: Env, device: torch.device | None,
                 pooled: bool = False, pools: dict | None = None) -> dict[str, SiteOp]:
    """Compile one composition per row into one op per site.

    Each site runs the rows' Stacks stage by stage; a stage is one
    :class:`RowGroups` (which module each row applies there), built once per
    distinct stage and shared by every site with the same modules.

    With ``pooled`` a stage's candidates are every attached module whose part at
    the site is stackable with a used one (same class, parameter shapes and
    dropout), not only the modules the rows use: the stacked weights then depend
    on the library alone and survive a change of the batch's modules (a serving
    batch changes them whenever a request joins or leaves; rebuilding the stacks
    then cost more than the forward, see docs/serving.md). ``pools`` keeps the
    pools between calls for one library.
    """
    pools = {} if pools is None else pools
    chains = [row_chain(r, env) for r in rows]
    order = {n: i for i, n in enumerate(env.library)}
    used = list(dict.fromkeys(n for c in chains for n in c))
    sites_of = {n: pools.get(n) or pools.setdefault(n, dict(env.library[n].items()))
                for n in (env.library if pooled else used)}
    groups: dict[tuple, tuple[list[str], RowGroups]] = {}
    stages_of: dict[tuple, list[tuple[list[str], RowGroups]]] = {}
    ops: dict[str, SiteOp] = {}
    for site in site_objects(used, env):
        here = tuple(n for n in used if site in sites_of[n])
        pool = _pool(site, here, sites_of, pools) if pooled else ()
        if (here, pool) not in stages_of:
            seqs = [[n for n in c if n in here] for c in chains]
            stages = []
            for j in range(max(len(s) for s in seqs)):
                key = tuple(s[j] if j < len(s) else None for s in seqs)
                if (key, pool) not in groups:
                    names = list(pool) or sorted({n for n in key if n is not None}, key=order.get)  # stable order
                    pos = {n: i for i, n in enumerate(names)}
                    groups[key, pool] = (names, RowGroups.from_list([pos.get(n, -1) for n in key], len(names), device))
                stages.append(groups[key, pool])
            stages_of[here, pool] = stages
        stages = [([sites_of[n][site] for n in names], g) for names, g in stages_of[here, pool]]
        ops[site] = (InputRowsOp if is_input_site(site) else RowsOp)(site, stages, env.cache)
    return ops


def _signature(part: nn.Module) -> tuple:
    """What must agree for parts to be stacked into one batched weight."""
    shapes = tuple((n, tuple(t.shape), t.dtype) for n, t in part.named_parameters())
    return type(part), shapes, float(getattr(getattr(part, "dropout", None), "p", 0.0) or 0.0)


def _pool(site: str, here: tuple[str, ...], sites_of: dict[str, dict[str, nn.Module]],
          memo: dict) -> tuple[str, ...]:
    """Every module (library order) whose part at ``site`` stacks with the part of a module in ``here``."""
    def sig(name: str) -> tuple:
        key = ("signature", name, site)
        return memo[key] if key in memo else memo.setdefault(key, _signature(sites_of[name][site]))

    wanted = frozenset(sig(n) for n in here)
    key = ("pool", site, wanted)
    if key not in memo:
        memo[key] = tuple(n for n, parts in sites_of.items() if site in parts and sig(n) in wanted)
    return memo[key]


class RowsOp:
    """A per-example site op: each stage applies one module per row, batched."""

    def __init__(self, site: str, stages: list[tuple[list[nn.Module], RowGroups]], cache: StackCache):
        self.site = site
        self.stages = [(parts, g, (site, tuple(id(p) for p in parts)), mixer_for(parts)) for parts, g in stages]
        self.cache = cache

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for parts, groups, key, fast in self.stages:
            y = mix(parts, x, y, groups, key, self.cache, fast)
        return y


class InputRowsOp(RowsOp):
    """A per-example op at an input site: each stage selects each row's call from its module's."""

    def __call__(self, module: nn.Module, call: dict) -> dict:
        for parts, groups, _, _ in self.stages:
            call = mix_rows([p.add_into for p in parts], module, call, groups)
        return call


class RowPlans:
    """The compiled plans of the last few per-row assignments of one model (least recently used dropped)."""

    def __init__(self, size: int = 8, pooled: bool = False):
        self.size, self.pooled = size, pooled
        self._plans: OrderedDict[Hashable, dict[str, SiteOp]] = OrderedDict()
        self._pools: dict = {}  # per module and site: its sites, signatures and pools, for the current library

    def get(self, rows: Sequence[Composition | None], env: Env, device: torch.device | None) -> dict[str, SiteOp]:
        """The plan for ``rows`` on ``env``'s library (compiled on first use).

        Raises:
            ConfigError: ``rows`` is not a list.
            CompositionError: a row is not a name, a Stack of names or None.
        """
        if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
            raise ConfigError(f"route() takes one composition per row (a list), got {rows!r}")
        key = (tuple(describe(r) for r in rows), tuple((n, id(m)) for n, m in env.library.items()), device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = compile_rows(rows, env, device, self.pooled, self._pools)
            if len(self._plans) > self.size:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return plan

    def clear(self) -> None:
        """Forget every compiled plan (the library changed)."""
        self._plans.clear()
        self._pools.clear()


# -- whole-call passes (Parallel, output ensembles) -------------------------------------------


def _batch_size(args: Sequence[Any], kwargs: dict[str, Any]) -> int:
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key].shape[0]
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.shape[0]
    raise StateError("a Parallel or output-ensemble call needs input_ids or inputs_embeds to replicate")


def _repeat(value: Any, copies: int, batch: int) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.repeat(copies, *([1] * (value.dim() - 1)))  # (P·B, …)
    return value


def _take(value: Any, i: int, batch: int, total: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[i * batch : (i + 1) * batch] if value.dim() > 0 and value.shape[0] == total else value
    if isinstance(value, tuple):
        return tuple(_take(v, i, batch, total) for v in value)
    if isinstance(value, dict):
        return type(value)(**{k: _take(v, i, batch, total) for k, v in value.items()})
    return value


def parallel_forward(model: Routable, parts: Sequence[Composition], args: Sequence[Any],
                     kwargs: dict[str, Any]) -> tuple:
    """Run the host once over the batch replicated per branch; one output per branch.

    Raises:
        StateError: the call carries a key/value cache (branches cannot share one).
    """
    if kwargs.get("past_key_values") is not None:
        raise StateError("Parallel branches run as one replicated batch and cannot continue a key/value cache; "
                         "call without past_key_values")
    batch, copies = _batch_size(args, kwargs), len(parts)
    rows = [b for b in parts for _ in range(batch)]
    rep_args = [_repeat(a, copies, batch) for a in args]
    rep_kwargs = {k: _repeat(v, copies, batch) for k, v in kwargs.items()}
    with model.routing.whole_call_pass(), model.route(rows):
        out = model.host(*rep_args, **rep_kwargs)
    return tuple(_take(out, i, batch, batch * copies) for i in range(copies))


def ensemble_forward(model: Routable, mix: Mix, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``Mix(..., aggregate="output")``: one replicated pass, then the router-weighted ensemble of logits."""
    outputs = parallel_forward(model, mix.children, args, kwargs)
    reference = logits_of(outputs[0])
    w = model.routing.routing(mix.router, None, None, reference[..., :0])
    if isinstance(w, RowGroups):
        w = w.weights(reference.dtype)  # (B, E)
    return combine(outputs, w)


def ensemble(model: Routable, candidates: Sequence[Composition], *args: Any, weights: Sequence[float] | None = None,
             **kwargs: Any) -> Any:
    """A weighted ensemble of the logits of several compositions, in one host pass.

    Args:
        model: a :class:`~polymod.Modular`.
        candidates: module names or Stacks of names.
        *args: the host call's positional arguments.
        weights: one weight per candidate (default uniform 1/E).
        **kwargs: the host call's keyword arguments.

    Returns:
        The host output type with ``logits = Σᵢ wᵢ logitsᵢ`` (other fields dropped).
    """
    w = [1.0 / len(candidates)] * len(candidates) if weights is None else list(weights)
    if len(w) != len(candidates):
        raise ConfigError(f"ensemble got {len(w)} weights for {len(candidates)} candidates")
    outputs = parallel_forward(model, candidates, args, kwargs)
    return combine(outputs, torch.tensor([w]))


def run_root(model: Routable, expr: Composition, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """``Modular.forward`` for compositions acting on the whole call."""
    if isinstance(expr, Mix):
        return ensemble_forward(model, expr, args, kwargs)
    return parallel_forward(model, branches(expr), args, kwargs)
