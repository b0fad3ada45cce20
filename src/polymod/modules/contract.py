"""The module contract: what every computation function provides.

The survey writes every modular method as a function added to the host's own,
``f'(x) = f_θ(x) + f_φ(x)``. polymod implements that split literally:

* a **spec** (``pm.LoRA(rank=8, sites=...)``) is a small frozen dataclass that
  names a kind, holds its hyper-parameters and knows how to build one *part*
  for a :class:`~polymod.sites.Site`;
* a **part** is an ``nn.Module`` holding φ for one site. Called as
  ``part(x, y)`` with the site's input ``x`` and the host's output
  ``y = f_θ(x)``, it returns the contribution ``Δy = f_φ(x, y)``; the engine
  adds it (``y + Δy``) or weighs it against other parts (routing, aggregation);
* a :class:`Module` bundles the parts of one named module with its spec and
  card. It is a plain container: kinds differ by their spec and part classes,
  never by subclassing ``Module``.

Optional part capabilities are declared as :class:`typing.Protocol` classes
below (runtime-checkable: the engine branches on ``isinstance``, at compile
time, never per token):

* :class:`FusedAdd` — ``add_into(x, y, weight) -> y'``: a fused ``y + weight·Δy`` (LoRA's ``addmm``);
* :class:`InPlaceAdd` — ``add_into_(x, y) -> y``: the same written into ``y`` where the engine owns it;
* :class:`WeightDelta` — ``delta_weight(layer) -> ΔW``: the change of the host weight in the host's own
  layout, which makes the module *mergeable* and lets parameter aggregation
  treat it like any other delta-bearing module;
* :class:`LowRankDelta` — ``delta_factors() -> (U, V)``: ΔW = U V as a (D_out, D_in) map of the site
  input, in factored form (LoRA: U = s·B, V = A), so spectral quantities of ΔW (Arrow's
  prototypes) cost O((D_in + D_out)·r²) instead of forming ΔW;
* :class:`BiasDelta` — ``delta_bias(layer) -> Δb | None``: the change of the host bias, for kinds
  whose merge also touches it (IA³ scaling a layer's output scales its bias);
  :meth:`~polymod.modular.Modular.merge_into_host` applies and restores it;
* :class:`ReadsHostLayer` — ``attach_layer(layer)``: called by ``Modular.add`` with the site's host layer,
  for parts whose Δy needs the host weight (IA³ scaling a layer's input computes
  Δy = W((l − 1) ⊙ x)). Parts keep it as a plain attribute, never a submodule,
  so the host never enters the module's state dict.
* :class:`ReadsRoutingInputs` — ``read_routing(inputs)``: called by ``Modular.add`` with the model's
  :class:`~polymod.routing.base.RoutingInputs`, for parts whose Δy depends on the per-call
  routing inputs of ``model.route(task=..., language=...)`` (a hypernetwork generating
  weights for the routed task), so every kind is routed through the same call.

*Input parts* act at input sites (kind ``input``: a call of the host or of one
of its stacks, see :mod:`polymod.inputs`). There ``x`` is the called module and
``y`` is the call's keyword arguments (a ``dict``; positional arguments already
named); ``add_into(x, y, weight)`` returns the new keyword arguments (for a
prompt: its virtual tokens, scaled by ``weight``, inserted before the call's
tokens — the survey's input composition f_θ([φ; x])), and ``part(x, y)``
returns the part's virtual tokens themselves, for input aggregation. Input
parts always define ``add_into``; ``y + Δy`` has no meaning for a call.

Optional spec capabilities, likewise declared:

* :class:`SharedParameters` — ``link_parts(parts)``, called with ``{site: part}`` whenever a
  :class:`Module` is built (attach, load, materialise), for kinds whose parts
  share parameters held by one of them (a hypernetwork shared by every site).
  Shared parameters then live, and are saved, exactly once: one part holds them as a
  submodule, the others reach them through :class:`Borrowed`.
* :class:`CopiesLayers` — ``copies_layer()``: the parts replace their sites' output with their own
  copy of the layer (a head, PEFT's ``modules_to_save``), so the host weights there are left out of
  the module's host fingerprint.
* :class:`HostDependentSites` — ``sites_for(host) -> selection``, used by ``Modular.add`` instead of
  ``spec.sites`` for kinds whose sites depend on the host (a bottleneck
  adapter's placement differs between post-LN BERT and pre-LN GPT-2/Llama/T5;
  an invertible adapter adds the LM head's input when there is one).

Adding a kind means one file under ``modules/`` that defines a spec and a part
and calls :func:`register` — nothing central to edit.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from polymod.card import Card
from polymod.errors import ConfigError, StateError, UnknownArgumentError
from polymod.sites import Site

if TYPE_CHECKING:  # routing sits above modules (library routers read module deltas): a type, never an import
    from polymod.routing.base import RoutingInputs


@runtime_checkable
class ModuleSpec(Protocol):
    """A module kind's configuration: a frozen dataclass validated in ``__post_init__``."""

    kind: ClassVar[str]

    @property
    def sites(self) -> Any:
        """The site selection (read-only: specs are frozen dataclasses)."""

    def check_site(self, site: Site) -> str | None:
        """Return why this kind cannot act at ``site``, or None when it can."""

    def build_part(self, site: Site, layer: nn.Module | None) -> nn.Module:
        """Create the part (parameters φ) for one site; ``layer`` is None when loading from disk."""


@runtime_checkable
class FusedAdd(Protocol):
    """A part that computes ``y + weight·Δy`` in one fused operation."""

    def add_into(self, x: Any, y: Any, weight: float = 1.0) -> Any:
        """``y + weight · f_φ(x, y)`` (at an input site: the call with the part's change applied)."""


@runtime_checkable
class InPlaceAdd(Protocol):
    """A part that can add Δy into a site output the engine owns."""

    def add_into_(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``y += f_φ(x, y)`` in place; returns ``y``."""


@runtime_checkable
class WeightDelta(Protocol):
    """A parameter-composition part: its effect is a change ΔW of the host weight."""

    def delta_weight(self, layer: nn.Module | None) -> torch.Tensor:
        """ΔW in the host weight's layout (``layer`` is the host layer, for kinds whose ΔW reads W)."""


@runtime_checkable
class LowRankDelta(Protocol):
    """A part whose weight change is a product of two thin factors."""

    def delta_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with U (D_out, r) and V (r, D_in): the map x ↦ U V x that the part adds at its site."""


@runtime_checkable
class BiasDelta(Protocol):
    """A part whose merge also changes the host bias."""

    def delta_bias(self, layer: nn.Module | None) -> torch.Tensor | None:
        """Δb, or None when the host layer has no bias to change."""


@runtime_checkable
class ReadsHostLayer(Protocol):
    """A part whose Δy reads the host layer at its site."""

    def attach_layer(self, layer: nn.Module) -> None:
        """Keep ``layer`` (a plain attribute, never a submodule)."""


@runtime_checkable
class ReadsRoutingInputs(Protocol):
    """A part whose Δy depends on the per-call routing inputs (``model.route(task=..., language=...)``)."""

    def read_routing(self, inputs: RoutingInputs) -> None:
        """Keep ``inputs`` (the model's one instance, updated in place for every call) to read at forward time."""


class Borrowed:
    """A reference to an ``nn.Module`` that another part holds (shared parameters, saved once).

    ``nn.Module`` registers a module assigned to an attribute as a submodule, which would save
    and count it once per part; wrapped in a plain object it stays a reference. ``.to()``,
    ``train()`` and ``deepcopy`` of the whole module reach it through the part that holds it.
    """

    __slots__ = ("module",)

    def __init__(self, module: nn.Module):
        self.module = module

    def __repr__(self) -> str:
        return f"Borrowed({type(self.module).__name__})"


@runtime_checkable
class SharedParameters(Protocol):
    """A spec whose parts share parameters held by one of them."""

    def link_parts(self, parts: dict[str, nn.Module]) -> None:
        """Connect the parts of one module to their shared parameters."""


@runtime_checkable
class HostDependentSites(Protocol):
    """A spec whose default sites depend on the host."""

    def sites_for(self, host: nn.Module) -> Any:
        """The site selection to use on ``host`` (a selector string, list or SiteSelector)."""


@runtime_checkable
class CopiesLayers(Protocol):
    """A spec whose parts compute their sites' whole output from their own copy of the layer (a head)."""

    def copies_layer(self) -> bool:
        """True: the host weights at the module's sites do not enter its function (nor its host fingerprint)."""


_KINDS: dict[str, type] = {}


# Other libraries' names for a spec field (PEFT's LoraConfig/IA3Config/PromptTuningConfig, AdapterHub's configs):
# a user's habit gets "did you mean" instead of a bare TypeError. The target must be a field of the spec.
FOREIGN_NAMES = {
    "r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout", "target_modules": "sites",
    "use_rslora": "rslora", "init_lora_weights": "init", "feedforward_modules": "feedforward",
    "num_virtual_tokens": "length", "reduction_factor": "reduction", "non_linearity": "activation",
    "adapter_dropout": "dropout", "layers_to_transform": "sites",
}
# Foreign settings that are not a field of any spec, with what to do instead.
FOREIGN_ADVICE = {
    "modules_to_save": "a trainable copy of a host layer (a task head) is a module of its own in polymod: "
                       "model.add('head', pm.Head(sites='classifier')) next to this one",
    "task_type": "polymod reads the task from the host itself; drop it",
    "bias": "polymod modules leave the host's biases frozen; drop it",
    "fan_in_fan_out": "polymod detects transposed (Conv1D) layers itself; drop it",
}


def unknown_argument_message(owner: str, unknown: list[str], fields: list[str]) -> str:
    """What was passed, what ``owner`` takes, and the likely intended name for each unknown argument."""
    hints = []
    for name in unknown:
        if name in FOREIGN_NAMES and FOREIGN_NAMES[name] in fields:
            hints.append(f"{name!r}: did you mean {FOREIGN_NAMES[name]!r}?")
        elif name in FOREIGN_ADVICE:
            hints.append(f"{name!r}: {FOREIGN_ADVICE[name]}")
        else:
            close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
            hints.append(f"{name!r}: did you mean {close[0]!r}?" if close else f"{name!r} is not a setting")
    return (f"{owner} got unexpected argument(s) {', '.join(map(repr, unknown))} ({'; '.join(hints)}). "
            f"{owner} takes: {', '.join(fields)}")


def _checked_init(spec_cls: type) -> None:
    """Wrap a spec dataclass's ``__init__`` so unknown keywords raise :class:`UnknownArgumentError` with a hint."""
    init = spec_cls.__init__
    fields = [f.name for f in dataclasses.fields(spec_cls) if f.init]

    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        unknown = [k for k in kwargs if k not in fields]
        if unknown:
            raise UnknownArgumentError(unknown_argument_message(spec_cls.__name__, unknown, fields))
        init(self, *args, **kwargs)

    spec_cls.__init__ = __init__  # type: ignore[method-assign]


def register(spec_cls: type) -> type:
    """Class decorator registering a spec class under its ``kind`` name.

    Unknown keyword arguments to the spec (another library's names such as PEFT's ``r`` or
    ``target_modules``) raise :class:`~polymod.errors.UnknownArgumentError` naming the polymod field.
    """
    kind = getattr(spec_cls, "kind", None)
    if not isinstance(kind, str) or not kind:
        raise TypeError(f"{spec_cls.__name__} needs a class attribute 'kind' to be registered")
    if kind in _KINDS and _KINDS[kind] is not spec_cls:
        raise TypeError(f"module kind {kind!r} is already registered by {_KINDS[kind].__name__}")
    if dataclasses.is_dataclass(spec_cls) and _KINDS.get(kind) is not spec_cls:
        _checked_init(spec_cls)
    _KINDS[kind] = spec_cls
    return spec_cls


def spec_class(kind: str) -> type:
    """The spec class registered for ``kind``.

    Raises:
        ConfigError: no such kind is registered.
    """
    if kind not in _KINDS:
        raise ConfigError(f"unknown module kind {kind!r}; registered kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[kind]


def registered_kinds() -> list[str]:
    """Names of every registered module kind."""
    return sorted(_KINDS)


def spec_to_dict(spec: Any) -> dict[str, Any]:
    """A JSON-ready dict of a spec's fields (site selectors as strings)."""
    out = {}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        out[f.name] = value if isinstance(value, (int, float, str, bool, type(None), list, dict)) else str(value)
        if isinstance(value, tuple):
            out[f.name] = list(value)
    return out


def spec_from_dict(kind: str, config: dict[str, Any]) -> Any:
    """Rebuild a spec of ``kind`` from :func:`spec_to_dict` output.

    Raises:
        ConfigError: unknown kind or fields the spec does not have.
    """
    cls = spec_class(kind)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - names)
    if unknown:
        raise UnknownArgumentError(unknown_argument_message(f"the {kind} config", unknown,
                                                            [f.name for f in dataclasses.fields(cls)]))
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return cls(**values)


def escape(site: str) -> str:
    """A site name usable as an ``nn.ModuleDict`` key (which may not contain dots)."""
    return site.replace(".", "/")


class Module(nn.Module):
    """One named module: its spec, its card and one part per site.

    ``Module`` is a container; what it computes lives in its parts. Use
    :meth:`part` to reach a site's parameters and :meth:`delta` for the weight
    change of a mergeable (parameter-composition) module.
    """

    def __init__(self, spec: Any, sites: list[Site], parts: list[nn.Module], card: Card | None = None):
        super().__init__()
        if len(sites) != len(parts):
            raise ConfigError(f"a {spec.kind} module needs one part per site, got {len(parts)} parts for "
                              f"{len(sites)} sites")
        self.spec = spec
        self.sites: dict[str, Site] = {s.name: s for s in sites}
        self.parts = nn.ModuleDict({escape(s.name): p for s, p in zip(sites, parts, strict=True)})
        self.card = card if card is not None else Card(kind=spec.kind, config=spec_to_dict(spec))
        self.card.sites = list(self.sites)
        if isinstance(spec, SharedParameters):  # kinds whose parts share parameters (hypernetworks)
            spec.link_parts({s.name: p for s, p in zip(sites, parts, strict=True)})

    @property
    def kind(self) -> str:
        """The registered kind name (``lora``, ``ia3``, ...)."""
        return self.spec.kind

    def part(self, site: str) -> nn.Module:
        """The part acting at ``site`` (a qualified host module name)."""
        return self.parts[escape(site)]

    def items(self) -> Iterator[tuple[str, nn.Module]]:
        """(site name, part) pairs in host order."""
        for name in self.sites:
            yield name, self.parts[escape(name)]

    @property
    def mergeable(self) -> bool:
        """Whether every part exposes a weight delta (parameter composition)."""
        return all(isinstance(p, WeightDelta) for p in self.parts.values())

    def delta(self, layers: dict[str, nn.Module] | None = None) -> dict[str, torch.Tensor]:
        """ΔW per site, in the host weight's layout.

        Args:
            layers: the host layers by site name; needed by kinds whose delta
                depends on the host weight (IA³ scales it). LoRA ignores it.

        Raises:
            StateError: the module is not a parameter-composition module.
        """
        if not self.mergeable:
            raise StateError(f"a {self.kind} module has no weight delta; only parameter-composition modules do")
        layers = layers or {}
        return {name: part.delta_weight(layers.get(name)) for name, part in self.items()}

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters φ (optionally only those requiring grad)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, sites={len(self.sites)}, params={self.num_parameters():,}"
