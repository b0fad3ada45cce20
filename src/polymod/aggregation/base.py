"""What every aggregator provides, and what compiling a composition reads.

The survey's aggregation function g combines the contributions of the modules a
router selected. In polymod an aggregator is a registered object named by
``Mix(..., aggregate=<name>)`` (see :mod:`polymod.aggregation` for the table):

* ``check(mix, modules, root)`` says why it cannot combine these candidates
  under this router (or None) — :func:`polymod.validation.check_tree` calls it
  when a composition is put to use, so a combination that cannot work is
  refused with its reason before anything runs;
* ``compile(mix, env)`` returns one op per site, ``{site: op(x, y) -> y'}``,
  that the engine runs in the site's forward hook.

An aggregator with ``whole_call = True`` acts on the whole host call instead of
at sites (an ensemble of outputs): it compiles to no site op and runs through
``model(**batch)``.

:class:`Env` is what compilation reads: the attached modules, the names merged
into the host (they act through the weights), the host layers, the routing
state, the stack cache, and a callback that compiles a child composition (the
recursive compiler lives above this package, in :mod:`polymod.plan`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from polymod.aggregation.cache import StackCache
from polymod.compose import Composition, Mix, describe
from polymod.modules.contract import Module
from polymod.routing.state import RoutingState
from polymod.sites import Site

SiteOp = Callable[[Any, Any], Any]  # (x, y) -> y' at a layer site; (module, call) -> call' at an input site


@dataclass
class Env:
    """What compilation reads (see the module docstring)."""

    library: Mapping[str, Module]
    skip: set[str]
    layers: Mapping[str, nn.Module]
    routing: RoutingState
    cache: StackCache
    compile_child: Callable[[Composition], dict[str, SiteOp]]


@runtime_checkable
class Aggregator(Protocol):
    """A registered aggregation function (see the module docstring)."""

    name: ClassVar[str]
    whole_call: ClassVar[bool]

    def check(self, mix: Mix, modules: Sequence[Module], root: bool) -> str | None:
        """Why this aggregator cannot combine ``mix``'s candidates (``modules``, its leaves), or None."""

    def compile(self, mix: Mix, env: Env) -> dict[str, SiteOp]:
        """One op per site where a candidate acts (empty for whole-call aggregators)."""


def labels(mix: Mix) -> list[str]:
    """Readable candidate names of a Mix: module names as they are, compositions described."""
    return [c if isinstance(c, str) else describe(c) for c in mix.children]


def leaf_names(mix: Mix) -> list[str] | None:
    """The candidates when every one is a module name, else None."""
    return list(mix.children) if all(isinstance(c, str) for c in mix.children) else None


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


def head_routing_refusal(mix: Mix, allowed: bool) -> str | None:
    """The refusal for multi-head routing (MHR), which only factor aggregation can carry out."""
    if not allowed and mix.router.heads > 1:
        return (f"multi-head routing ({mix.router}) splits LoRA's A and B into blocks, so it needs "
                "aggregate='factors'")
    return None
