"""What every router provides: weights over candidates, auxiliary losses, statistics.

The survey's routing function r(x) decides which modules act on an input. A
router here returns *weights over the candidates* of one ``Mix`` at a *level*:

* ``task``    — one weight vector per task id (the whole batch, or one per row);
* ``example`` — one weight vector per row of the batch;
* ``token``   — one weight vector per token.

A router is *global* when its decision does not depend on the hidden state at
a site (fixed routers, hash, Polytropon's task-skill matrix): it is computed
once per host forward and reused by every site. It is *local* when it reads
the site's input ``x`` (softmax gate, top-k, attention fusion): each site then
has its own router parameters, created by :meth:`Router.bind` (one gate per
layer, as in Switch/GShard MoE layers).

Every router keeps :class:`RouterStats` (per-module load, routing entropy,
dropped tokens) so collapse is visible, and exposes the auxiliary losses of the
last forward in ``aux_losses`` (already multiplied by their coefficients);
:meth:`polymod.Modular.aux_loss` sums them for a trainer.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import torch
from torch import nn

from polymod.errors import CompositionError, ConfigError
from polymod.sites import Site

Level = Literal["task", "example", "token"]
LEVELS = ("task", "example", "token")

_ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator registering a router under its ``name`` (used by composition JSON)."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute 'name' to be registered")
    if name in _ROUTERS and _ROUTERS[name] is not cls:
        raise TypeError(f"router {name!r} is already registered by {_ROUTERS[name].__name__}")
    _ROUTERS[name] = cls
    return cls


def router_from_json(data: Any) -> Router:
    """Rebuild a router from :meth:`Router.to_json` output (configuration only, not learned weights).

    Raises:
        CompositionError: unknown router type or bad arguments.
    """
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise CompositionError(f"a router is a dict with a 'type' key, got {data!r}")
    kind = data["type"]
    if kind not in _ROUTERS:
        raise CompositionError(f"unknown router type {kind!r}; registered: {', '.join(sorted(_ROUTERS))}")
    args = {k: v for k, v in data.items() if k != "type"}
    try:
        return _ROUTERS[kind](**args)
    except TypeError as exc:
        raise CompositionError(f"router {kind!r} does not take {sorted(args)}: {exc}") from exc


def registered_routers() -> list[str]:
    """Names of every registered router type."""
    return sorted(_ROUTERS)


@dataclass
class RoutingInputs:
    """What a router may read besides the hidden state at a site.

    The per-call inputs of :meth:`polymod.Modular.route` (task ids, module names
    per example, token spans) and what the host was called with (the attention
    mask, the token ids it embedded). One instance lives in the model's routing
    state; routers receive it as the first argument of :meth:`Router.weights`.

    Attributes:
        task: task ids, (R,) with R = 1 (the batch) or one per row.
        task_names: task names instead of ids (``route(task="mnli")`` or one per row), for kinds
            that know their tasks by name (a hypernetwork's task embeddings).
        language: a language name for the batch, or one per row (Hyper-X's language embeddings).
        names: module names per row, for ``ExampleRouter``.
        spans: per row, ``(start, end, name)`` token spans, for ``SpanRouter``.
        token_ids: the token ids the host embedded last.
        attention_mask: the (B, T) padding mask of the last host call.
    """

    task: torch.Tensor | None = None
    task_names: str | list[str] | None = None
    language: str | list[str] | None = None
    names: list[str | None] | None = None
    spans: list[Any] | None = None
    token_ids: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    ids_by_shape: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def ids_for(self, lead: tuple[int, ...]) -> torch.Tensor | None:
        """The most recently embedded token ids of shape ``lead`` (B, T), e.g. the encoder's at cross-attention."""
        return self.ids_by_shape.get(tuple(lead))


class RouterStats:
    """Running routing statistics, accumulated over forwards until :meth:`reset`.

    Tensors stay on the device (no host synchronisation per forward); read them
    with :meth:`summary`.
    """

    def __init__(self, candidates: Sequence[str] = ()):
        self.candidates = list(candidates)
        self.reset()

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._mass: torch.Tensor | None = None  # (E,) routed weight per candidate
        self._entropy = 0.0
        self._rows = 0
        self._dropped = 0
        self._assigned = 0

    @torch.no_grad()
    def update(self, weights: torch.Tensor, dropped: torch.Tensor | int = 0, assigned: int = 0) -> None:
        """Record one routing decision.

        Args:
            weights: (..., E) non-negative weights, one row per routed unit (task, row or token).
            dropped: units whose assignment was dropped for capacity (top-k).
            assigned: units × k assignments attempted (denominator of the drop rate).
        """
        w = weights.detach().float().reshape(-1, weights.shape[-1])  # (N, E)
        mass = w.sum(0)
        self._mass = mass if self._mass is None or self._mass.shape != mass.shape else self._mass + mass
        p = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
        self._entropy = self._entropy + (-(p * p.clamp_min(1e-12).log()).sum(-1)).sum()
        self._rows += w.shape[0]
        self._dropped = self._dropped + dropped
        self._assigned += assigned

    @property
    def load(self) -> torch.Tensor | None:
        """Share of the routed weight each candidate received, (E,) summing to 1."""
        if self._mass is None:
            return None
        return self._mass / self._mass.sum().clamp_min(1e-12)

    def summary(self) -> dict[str, Any]:
        """Load per candidate, max share, mean entropy (nats), dropped units and drop rate."""
        load = self.load
        out: dict[str, Any] = {"units": self._rows}
        if load is not None:
            names = self.candidates if len(self.candidates) == load.numel() else range(load.numel())
            out["load"] = {str(n): round(float(v), 6) for n, v in zip(names, load.tolist())}
            out["max_share"] = float(load.max())
            out["entropy"] = float(self._entropy) / max(self._rows, 1)
        out["dropped"] = int(self._dropped)
        if self._assigned:
            out["drop_rate"] = int(self._dropped) / self._assigned
        return out


class Router(nn.Module):
    """Base of every router: binding to a Mix, auxiliary losses, statistics, JSON.

    Subclasses set ``name`` (registry key), ``local`` (computed per site),
    ``reads_hidden`` (needs the site's hidden state),
    implement :meth:`weights` and, when they have per-site parameters,
    :meth:`build_site`. One level of inheritance only: shared behaviour is here,
    variants are separate files.
    """

    name: ClassVar[str] = ""
    local: ClassVar[bool] = False  # computed at each site (per-site parameters)
    reads_hidden: ClassVar[bool] = False  # needs the site's hidden state x
    needs_outputs: ClassVar[bool] = False  # needs the candidates' outputs (attention fusion)
    heads: int = 1  # H, routing heads (multi-head routing, MHR, splits A and B into H blocks)

    def __init__(self, level: Level):
        super().__init__()
        if level not in LEVELS:
            raise ConfigError(f"router level must be one of {', '.join(LEVELS)}, got {level!r}")
        self.level: Level = level
        self.candidates: list[str] = []
        self.per_site = nn.ModuleDict()
        self.stats = RouterStats()
        self.aux_losses: dict[str, torch.Tensor] = {}

    # -- binding ------------------------------------------------------------------------

    def bind(self, candidates: Sequence[str], sites: Sequence[Site], like: torch.Tensor | None) -> None:
        """Attach the router to a Mix's candidates and sites (idempotent for the same ones).

        Args:
            candidates: readable names of the Mix's candidates, in order.
            sites: the sites where the Mix acts.
            like: a host tensor giving the device and dtype of new parameters.

        Raises:
            CompositionError: the router is already bound to other candidates.
        """
        candidates = list(candidates)
        if self.candidates and self.candidates != candidates:
            raise CompositionError(
                f"{self} is already bound to candidates {self.candidates}; a router instance serves one Mix, "
                f"got {candidates}. Create a new router for this Mix."
            )
        if self.candidates != candidates:
            self.stats = RouterStats(candidates)
        self.candidates = candidates
        self.check_candidates(candidates)
        for site in sites:
            key = site.name.replace(".", "/")
            if self.local and key not in self.per_site:
                self.per_site[key] = self.build_site(site, len(candidates), like)

    def check_candidates(self, candidates: list[str]) -> None:
        """Raise CompositionError when this router cannot serve these candidates (override)."""

    def build_site(self, site: Site, num: int, like: torch.Tensor | None) -> nn.Module:
        """Parameters of a local router at one site (override in local routers)."""
        raise NotImplementedError

    def site_params(self, site: str) -> nn.Module:
        """The per-site parameters bound at ``site``."""
        return self.per_site[site.replace(".", "/")]

    @property
    def num(self) -> int:
        """E, the number of candidates."""
        return len(self.candidates)

    # -- routing ------------------------------------------------------------------------

    def weights(self, inputs: RoutingInputs, site: str | None, x: torch.Tensor | None, y: torch.Tensor | None,
                outputs: torch.Tensor | None = None) -> Any:
        """Weights over the candidates (override).

        Global routers are called once per forward with ``site=None``; local
        routers once per site with its input ``x`` and host output ``y``.

        Returns:
            A tensor (R, E) for task/example level (R = 1 or batch), ``lead + (E,)``
            for token level, or a :class:`~polymod.routing.groups.RowGroups` for
            one-hot example routing.
        """
        raise NotImplementedError

    def cache_key(self, inputs: RoutingInputs, y: torch.Tensor) -> Any:
        """What a global router's weights depend on besides the forward (token level: the site's shape)."""
        return tuple(y.shape[:-1]) if self.level == "token" else None

    def add_aux(self, name: str, value: torch.Tensor) -> None:
        """Accumulate an auxiliary loss over the sites of one forward."""
        self.aux_losses[name] = self.aux_losses[name] + value if name in self.aux_losses else value

    def begin_forward(self) -> None:
        """Forget the previous forward's auxiliary losses."""
        self.aux_losses = {}

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of this router's auxiliary losses in the last forward (None when it has none)."""
        return sum(self.aux_losses.values()) if self.aux_losses else None

    # -- description --------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """Constructor arguments (override); ``to_json`` adds the type."""
        return {"level": self.level}

    def to_json(self) -> dict[str, Any]:
        """JSON-ready configuration (learned weights live in ``state_dict()``)."""
        return {"type": self.name, **self.config()}

    def __repr__(self) -> str:
        defaults = {k: p.default for k, p in inspect.signature(type(self).__init__).parameters.items()}
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if defaults.get(k, object()) != v)
        return f"{type(self).__name__}({args})"

    __str__ = __repr__


@runtime_checkable
class ReadsModules(Protocol):
    """A router whose decision is computed from the candidates' own weights (library routers: Arrow).

    Validation asks :meth:`check_modules` whether the candidates' kinds allow it;
    compilation calls :meth:`bind_modules` once per site with the candidates'
    parts there (None where a candidate does not act), so the router can derive
    its per-site data (prototypes) from the weights, with no training data.
    """

    def check_modules(self, names: Sequence[str], modules: Sequence[Any]) -> str | None:
        """Why this router cannot route these modules (kind, site), or None."""

    def bind_modules(self, site: Site, names: Sequence[str], parts: Sequence[nn.Module | None],
                     layer: nn.Module | None) -> None:
        """Derive the router's data at ``site`` from the parts of the candidates acting there."""


def pool(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens, ignoring padding when ``mask`` (B, T) fits ``x`` (B, T, D)."""
    if x.dim() < 3:
        return x  # already one vector per row, e.g. a pooler site
    if mask is not None and mask.shape == x.shape[:2]:
        m = mask.to(x.dtype).unsqueeze(-1)  # (B, T, 1)
        return (x * m).sum(1) / m.sum(1).clamp_min(1.0)  # (B, D)
    return x.mean(1)  # (B, D)
