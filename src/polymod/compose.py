"""Compositions: the active arrangement of modules, as a small expression tree.

A composition is data — validated, printable and saved to JSON — with module
names as leaves::

    "sentiment"                   one module
    Stack("en", "sentiment")      sequential function composition (MAD-X)

``compile_plan`` turns a composition into a *plan*: for every site, one
callable ``op(x, y) -> y'`` that the engine runs in the site's forward hook.
Routing and aggregation nodes extend this file (``Mix``, ``Parallel``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from polymod.errors import CompositionError, UnknownModuleError
from polymod.modules.contract import Module

SiteOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, init=False)
class Stack:
    """Sequential composition: each child acts on the output of the previous one.

    At a site where several children have parts, ``y`` flows through them in
    order: ``y₁ = y + f_a(x, y)``, ``y₂ = y₁ + f_b(x, y₁)`` — MAD-X's language
    adapter followed by its task adapter.
    """

    children: tuple[Composition, ...]

    def __init__(self, *children: Composition):
        if not children:
            raise CompositionError("Stack() needs at least one child, e.g. Stack('en', 'task')")
        for c in children:
            if not isinstance(c, (str, Stack)):
                raise CompositionError(f"Stack children must be module names or compositions, got {c!r}")
        object.__setattr__(self, "children", tuple(children))

    def __str__(self) -> str:
        return f"Stack({', '.join(describe(c) for c in self.children)})"

    def to_json(self) -> dict[str, Any]:
        return {"stack": [to_json(c) for c in self.children]}


Composition = str | Stack


def describe(expr: Composition | None) -> str:
    """A short readable form of a composition."""
    if expr is None:
        return "none (host only)"
    return repr(expr) if isinstance(expr, str) else str(expr)


def to_json(expr: Composition) -> Any:
    """A JSON-ready form of a composition."""
    return expr if isinstance(expr, str) else expr.to_json()


def from_json(data: Any) -> Composition:
    """Rebuild a composition from :func:`to_json` output.

    Raises:
        CompositionError: the data is not a composition.
    """
    if isinstance(data, str):
        return data
    if isinstance(data, dict) and set(data) == {"stack"} and isinstance(data["stack"], list):
        return Stack(*(from_json(c) for c in data["stack"]))
    raise CompositionError(f"not a composition: {data!r}; expected a module name or {{'stack': [...]}}")


def leaves(expr: Composition) -> list[str]:
    """Module names used by a composition, in order of appearance."""
    if isinstance(expr, str):
        return [expr]
    return [name for c in expr.children for name in leaves(c)]


def validate(expr: Composition, library: Mapping[str, Module]) -> None:
    """Check that every leaf names a module in ``library``.

    Raises:
        UnknownModuleError: a leaf is not in the library.
        CompositionError: the expression is malformed.
    """
    if not isinstance(expr, (str, Stack)):
        raise CompositionError(f"use() takes a module name or a composition, got {type(expr).__name__}")
    for name in leaves(expr):
        if name not in library:
            raise UnknownModuleError(
                f"composition {describe(expr)} names module {name!r}, which is not attached; "
                f"attached: {', '.join(library) or 'none'}. Add it with model.add({name!r}, spec) first."
            )


def _apply(part: torch.nn.Module) -> SiteOp:
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


def compile_plan(expr: Composition | None, library: Mapping[str, Module], skip: set[str]) -> dict[str, SiteOp]:
    """Turn a composition into one op per site.

    Args:
        expr: the active composition (None: no module acts).
        library: attached modules by name.
        skip: names of modules already merged into the host weights (they act
            through the weights; running them again would count them twice).

    Returns:
        site name → ``op(x, y) -> y'``.
    """
    if expr is None:
        return {}
    per_site: dict[str, list[SiteOp]] = {}
    for name in leaves(expr):
        if name in skip:
            continue
        for site, part in library[name].items():
            per_site.setdefault(site, []).append(_apply(part))
    return {site: ops[0] if len(ops) == 1 else _chain(ops) for site, ops in per_site.items()}
