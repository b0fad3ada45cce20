"""The composition engine: compositions → one op per site.

Every node compiles to ``{site: op(x, y) -> y'}``:

* a module name runs its part: ``y + f_φ(x, y)`` (the part's fused ``add_into``
  when it has one; in place, ``add_into_``, where the node owns the site output);
* ``Stack`` chains its children's ops at each site;
* ``Mix`` asks its registered aggregator (:mod:`polymod.aggregation`) for its
  ops — routing and aggregation happen there, through the batched mixers;
* ``Parallel`` and whole-call aggregators (``Mix(aggregate="output")``) act on
  the whole host call; they compile to no site op and run through
  :meth:`polymod.Modular.forward` (:mod:`polymod.rows`).

Per-example assignments (``model.route([...])``) compile in :mod:`polymod.rows`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from polymod.aggregation import aggregator
from polymod.aggregation.base import Env, SiteOp
from polymod.aggregation.cache import StackCache
from polymod.compose import Composition, Mix, Parallel, Stack, describe, leaves
from polymod.errors import CompositionError, StateError
from polymod.modules.contract import FusedAdd, InPlaceAdd, Module
from polymod.routing.state import RoutingState


def runs_whole_model(expr: Composition) -> bool:
    """Whether ``expr`` acts on the whole host call (Parallel branches, whole-call aggregators)."""
    if isinstance(expr, Parallel):
        return True
    if isinstance(expr, Mix):
        return aggregator(expr.aggregate).whole_call
    if isinstance(expr, Stack):
        return isinstance(expr.children[-1], Parallel)
    return False


def compile_plan(expr: Composition | None, library: Mapping[str, Module], skip: set[str],
                 layers: Mapping[str, nn.Module], routing: RoutingState, cache: StackCache) -> dict[str, SiteOp]:
    """Turn the active composition into one op per site; registers its routers with ``routing``.

    Args:
        expr: the active composition (None: no module acts).
        library: attached modules by name.
        skip: names of modules merged into the host weights (they act through the
            weights; running them again would count them twice).
        layers: host layers by site name.
        routing: the model's routing state (routers are bound to it).
        cache: the model's stack cache.

    Returns:
        site name → ``op(x, y) -> y'``.
    """
    routing.start_compile(expr if expr is not None and runs_whole_model(expr) else None)
    if expr is None:
        return {}
    env = Env(library, skip, layers, routing, cache, compile_child=lambda child: compile_node(child, env))
    if runs_whole_model(expr):
        return aggregator(expr.aggregate).compile(expr, env) if isinstance(expr, Mix) else {}
    return compile_node(expr, env, inplace=True)


def compile_node(node: Composition, env: Env, inplace: bool = False) -> dict[str, SiteOp]:
    """Compile one node (see the module docstring).

    ``inplace`` marks nodes that own the site output they receive (the root and
    the children of a root Stack): their parts may update it in place
    (``add_into_``). Mix candidates share one output, so they never do.

    Raises:
        CompositionError: a Parallel node below the root.
        StateError: a Mix candidate is merged into the host weights.
    """
    if isinstance(node, str):
        if node in env.skip:
            return {}
        return {site: leaf_op(part, inplace) for site, part in env.library[node].items()}
    if isinstance(node, Stack):
        per_site: dict[str, list[SiteOp]] = {}
        for child in node.children:
            for site, op in compile_node(child, env, inplace).items():
                per_site.setdefault(site, []).append(op)
        return {site: ops[0] if len(ops) == 1 else _chain(ops) for site, ops in per_site.items()}
    if isinstance(node, Mix):
        merged = [n for n in leaves(node) if n in env.skip]
        if merged:
            raise StateError(
                f"module {merged[0]!r} is merged into the host weights, so it acts with weight 1 on every input; "
                f"it cannot be a candidate of {describe(node)}. Call model.unmerge({merged[0]!r}) first."
            )
        return aggregator(node.aggregate).compile(node, env)
    raise CompositionError(f"{describe(node)} can only be the root of a composition or the last child of a root Stack")


def leaf_op(part: nn.Module, inplace: bool = False) -> SiteOp:
    """The op of one module at one site: ``y + f_φ(x, y)``, fused where the part offers it."""
    if inplace and isinstance(part, InPlaceAdd):
        return part.add_into_
    if isinstance(part, FusedAdd):
        return part.add_into
    return lambda x, y: y + part(x, y)


def _chain(ops: list[SiteOp]) -> SiteOp:
    def run(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for op in ops:
            y = op(x, y)
        return y

    return run
