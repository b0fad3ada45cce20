"""Forward-time aggregation: the survey's aggregation functions g, one registered object each.

``Mix(candidates, router, aggregate=<name>)`` names an aggregator from
:data:`AGGREGATORS`, the one table the engine reads:

=============  ==========================================================  =========================
name           y' at a site (wᵢ from the router)                            file
=============  ==========================================================  =========================
``sum``        y + Σᵢ wᵢ Δyᵢ                                                ``representation.py``
``mean``       y + mean of the selected Δyᵢ                                 ``representation.py``
``attention``  Σᵢ sᵢ V (y + Δyᵢ) (AdapterFusion)                            ``representation.py``
``delta``      y + x (Σᵢ wᵢ ΔWᵢ)ᵀ                                           ``parameter.py``
``factors``    y + (Σᵢ wᵢ sᵢ Bᵢ)(Σᵢ wᵢ Aᵢ) x (Polytropon, LoRA only)          ``parameter.py``
``input``      f_θ([P₁; …; Pₖ; x]) (prompts/prefixes concatenated)          ``input.py``
``output``     Σᵢ wᵢ logitsᵢ over whole host calls                          ``output.py``
=============  ==========================================================  =========================

Offline merging (task arithmetic, TIES, DARE, ...) produces a new module once,
before inference; it lives in :mod:`polymod.merging`.
"""

from __future__ import annotations

from polymod.aggregation.base import Aggregator
from polymod.aggregation.input import Input
from polymod.aggregation.output import Output
from polymod.aggregation.parameter import Parameter
from polymod.aggregation.representation import Representation
from polymod.errors import CompositionError

AGGREGATORS: dict[str, Aggregator] = {}
"""Every registered aggregator by its ``aggregate=`` name (filled by :func:`register_aggregator`)."""


def register_aggregator(aggregator: Aggregator) -> Aggregator:
    """Add an aggregator to :data:`AGGREGATORS` under its ``name``.

    Raises:
        TypeError: it does not implement the :class:`~polymod.aggregation.base.Aggregator`
            protocol, or its name is taken by another aggregator.
    """
    if not isinstance(aggregator, Aggregator) or not isinstance(getattr(aggregator, "name", None), str):
        raise TypeError(f"{aggregator!r} is not an aggregator: it needs a name, whole_call, check() and compile()")
    if aggregator.name in AGGREGATORS and AGGREGATORS[aggregator.name] is not aggregator:
        raise TypeError(f"aggregator {aggregator.name!r} is already registered")
    AGGREGATORS[aggregator.name] = aggregator
    return aggregator


def aggregator(name: str) -> Aggregator:
    """The registered aggregator called ``name``.

    Raises:
        CompositionError: no aggregator has that name.
    """
    if name not in AGGREGATORS:
        raise CompositionError(f"Mix aggregate must be one of {', '.join(AGGREGATORS)}, got {name!r}")
    return AGGREGATORS[name]


for _builtin in (Representation("sum"), Representation("mean"), Representation("attention"), Parameter("delta"),
                 Parameter("factors"), Input(), Output()):
    register_aggregator(_builtin)

__all__ = ["AGGREGATORS", "Aggregator", "aggregator", "register_aggregator"]
