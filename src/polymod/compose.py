"""Compositions: the active arrangement of modules, as a small expression tree.

A composition is data — validated, printable and saved to JSON — with module
names as leaves::

    "sentiment"                             one module
    Stack("en", "sentiment")                sequential function composition (MAD-X)
    Mix(["a", "b", "c"], router=TopK(k=2))  routing + aggregation over candidates
    Parallel("a", "b")                      one pass, one output per branch

``Mix(candidates, router, aggregate)`` is the survey's pair of functions: the
router r(x) gives weights over the candidates, the aggregator g combines their
contributions — representations (``sum``: y + Σ wᵢ Δyᵢ; ``mean`` over the
selected candidates; ``attention``: AdapterFusion's value-projected sum),
parameters (``delta``: Σ wᵢ ΔWᵢ; ``factors``: LoRA's A and B mixed separately,
as in Polytropon), inputs (``input``: the candidates' prompts concatenated) or
outputs (``output``: a weighted ensemble of the host's final logits).

This file holds the tree, its printing and its JSON, nothing else: which
aggregators exist, whether a composition can act on the attached modules
(:mod:`polymod.validation`) and how it runs (:mod:`polymod.plan`) are the
engine's business, decided when :meth:`polymod.Modular.use` puts it to work.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from polymod.errors import CompositionError, UnknownModuleError
from polymod.routing.base import Router, router_from_json
from polymod.routing.fixed import Static


def _check_child(node: str, c: Any) -> None:
    if not isinstance(c, (str, Stack, Mix, Parallel)):
        raise CompositionError(f"{node} children must be module names or compositions, got {c!r}")


class Stack:
    """Sequential composition: each child acts on the output of the previous one.

    At a site where several children have parts, ``y`` flows through them in
    order: ``y₁ = y + f_a(x, y)``, ``y₂ = y₁ + f_b(x, y₁)`` — MAD-X's language
    adapter followed by its task adapter.
    """

    __slots__ = ("children",)

    def __init__(self, *children: Composition):
        if not children:
            raise CompositionError("Stack() needs at least one child, e.g. Stack('en', 'task')")
        for c in children:
            _check_child("Stack", c)
        self.children: tuple[Composition, ...] = tuple(children)

    def __str__(self) -> str:
        return f"Stack({', '.join(describe(c) for c in self.children)})"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Stack) and self.children == other.children

    def __hash__(self) -> int:
        return hash(("stack", self.children))

    def to_json(self) -> dict[str, Any]:
        return {"stack": [to_json(c) for c in self.children]}


class Mix:
    """Routing and aggregation over candidates: ``y' = g({f_i}, r(x))``.

    Args:
        candidates: module names or compositions (at least one, no duplicates).
        router: a router from :mod:`polymod.routing`; None means uniform weights 1/E
            (``Static()``), i.e. representation averaging.
        aggregate: the name of a registered aggregator: ``sum`` (default), ``mean``,
            ``attention``, ``delta``, ``factors``, ``input`` or ``output`` (see the module
            docstring and :mod:`polymod.aggregation`); checked when the composition is used.

    Raises:
        CompositionError: empty or duplicate candidates, an aggregate that is not a
            name, a router that is not a Router.
    """

    __slots__ = ("children", "router", "aggregate")

    def __init__(self, candidates: Sequence[Composition], router: Router | None = None, aggregate: str = "sum"):
        if isinstance(candidates, (str, Stack, Mix, Parallel)) or not isinstance(candidates, Sequence):
            raise CompositionError(f"Mix takes a list of candidates, e.g. Mix(['a', 'b']), got {candidates!r}")
        if not candidates:
            raise CompositionError("Mix() needs at least one candidate, e.g. Mix(['a', 'b'])")
        for c in candidates:
            _check_child("Mix", c)
        seen = [describe(c) for c in candidates]
        dupes = sorted({s for s in seen if seen.count(s) > 1})
        if dupes:
            raise CompositionError(f"Mix candidates must be distinct, got {', '.join(dupes)} more than once")
        if not isinstance(aggregate, str) or not aggregate:
            raise CompositionError(f"Mix aggregate must be an aggregator's name such as 'sum', got {aggregate!r}")
        if router is None:
            router = Static()
        if not isinstance(router, Router):
            raise CompositionError(f"Mix router must be a polymod router (e.g. pm.TopK(k=2)), got {router!r}")
        self.children: tuple[Composition, ...] = tuple(candidates)
        self.router = router
        self.aggregate = aggregate

    def __str__(self) -> str:
        names = ", ".join(describe(c) for c in self.children)
        return f"Mix([{names}], router={self.router}, aggregate={self.aggregate!r})"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mix) and self.to_json() == other.to_json()

    def __hash__(self) -> int:
        return hash(("mix", self.children, self.aggregate))

    def to_json(self) -> dict[str, Any]:
        return {"mix": [to_json(c) for c in self.children], "router": self.router.to_json(),
                "aggregate": self.aggregate}


class Parallel:
    """One pass, one output per branch: the batch is replicated once per branch.

    ``model(**batch)`` returns a tuple with one host output per branch (e.g.
    several task heads over one shared encoder pass). Allowed at the root of a
    composition or as the last child of a root Stack (``Stack("en", Parallel("a",
    "b"))`` shares "en" between the branches).
    """

    __slots__ = ("children",)

    def __init__(self, *branches: Composition):
        if not branches:
            raise CompositionError("Parallel() needs at least one branch, e.g. Parallel('a', 'b')")
        for c in branches:
            _check_child("Parallel", c)
        self.children: tuple[Composition, ...] = tuple(branches)

    def __str__(self) -> str:
        return f"Parallel({', '.join(describe(c) for c in self.children)})"

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Parallel) and self.children == other.children

    def __hash__(self) -> int:
        return hash(("parallel", self.children))

    def to_json(self) -> dict[str, Any]:
        return {"parallel": [to_json(c) for c in self.children]}


Composition = str | Stack | Mix | Parallel


def describe(expr: Composition | None) -> str:
    """A short readable form of a composition."""
    if expr is None:
        return "none (host only)"
    return repr(expr) if isinstance(expr, str) else str(expr)


def pretty(expr: Composition | None, indent: str = "") -> str:
    """A multi-line, indented form of a composition (one node per line when long)."""
    one = describe(expr)
    if isinstance(expr, str) or expr is None or len(one) + len(indent) <= 100:
        return indent + one
    head = type(expr).__name__ + ("([" if isinstance(expr, Mix) else "(")
    body = ",\n".join(pretty(c, indent + "    ") for c in expr.children)
    tail = f"], router={expr.router}, aggregate={expr.aggregate!r})" if isinstance(expr, Mix) else ")"
    return f"{indent}{head}\n{body}\n{indent}{tail}"


def to_json(expr: Composition) -> Any:
    """A JSON-ready form of a composition (routers as their configuration)."""
    return expr if isinstance(expr, str) else expr.to_json()


def from_json(data: Any) -> Composition:
    """Rebuild a composition from :func:`to_json` output.

    Learned router weights are not part of the JSON; load them with
    ``router.load_state_dict``.

    Raises:
        CompositionError: the data is not a composition.
    """
    if isinstance(data, str):
        return data
    if isinstance(data, dict):
        keys = set(data)
        if keys == {"stack"} and isinstance(data["stack"], list):
            return Stack(*(from_json(c) for c in data["stack"]))
        if keys == {"parallel"} and isinstance(data["parallel"], list):
            return Parallel(*(from_json(c) for c in data["parallel"]))
        if "mix" in keys and keys <= {"mix", "router", "aggregate"} and isinstance(data["mix"], list):
            router = router_from_json(data["router"]) if "router" in data else None
            return Mix([from_json(c) for c in data["mix"]], router=router, aggregate=data.get("aggregate", "sum"))
    raise CompositionError(
        f"not a composition: {data!r}; expected a module name, {{'stack': [...]}}, {{'parallel': [...]}} "
        "or {'mix': [...], 'router': {...}, 'aggregate': ...}"
    )


def leaves(expr: Composition) -> list[str]:
    """Module names used by a composition, in order of appearance."""
    if isinstance(expr, str):
        return [expr]
    return [name for c in expr.children for name in leaves(c)]


def unknown(name: str, expr: Composition, attached: Iterable[str]) -> UnknownModuleError:
    """The error for a leaf that names no attached module."""
    return UnknownModuleError(
        f"composition {describe(expr)} names module {name!r}, which is not attached; "
        f"attached: {', '.join(attached) or 'none'}. Add it with model.add({name!r}, spec) first."
    )
