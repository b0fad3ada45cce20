"""Libraries from the hub: a set of published modules, ready to be composed with no routing data.

``pm.hub.library(query_or_refs, host=...)`` pulls modules (a free-text search
query with facet filters, or an explicit list of ``owner/name[@version]``
references), checks each against the host (the one fit check of
:mod:`polymod.format`) and returns a :class:`Library`: a mapping from
candidate names to modules that attaches to a :class:`~polymod.Modular` and
builds the library routers with their router data taken from the hub's
derived artifacts (:mod:`polymod.hub.derived`), computed only when missing::

    lib = pm.hub.library("sentiment", host=host, kind="lora")
    lib.attach(model)
    model.use(lib.mix(lib.arrow(top_k=3)))

Transforms and their configs (the derived-artifact keys):

* ``arrow-prototypes`` — ``{"method": "svd-top1"}``, plus the host weights'
  digest at the module's sites for kinds whose ΔW reads the host (IA³);
* ``retrieval-centroid`` — ``{"encoder": <name>, "examples": <sha256 of the texts>}``;
* ``phatgoose-gates`` — the gate-training recipe's config (steps, lr, data digest, ...), as the
  contributor gives it to :meth:`Library.store_gates`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polymod import format
from polymod.compose import Mix
from polymod.errors import ConfigError, StateError
from polymod.hub import names
from polymod.hub.client import HubLike, LocalHub, connect
from polymod.hub.derived import DerivedInfo, DerivedStore
from polymod.hub.derived_remote import RemoteDerivedStore
from polymod.modules.contract import Module, ReadsHostLayer
from polymod.routing.arrow import Arrow, arrow_prototypes
from polymod.routing.base import Router
from polymod.routing.phatgoose import Phatgoose
from polymod.routing.retrieval import Encoder, Retrieval, centroid, encoder_name, examples_digest
from polymod.sites import named_layers

ARROW = "arrow-prototypes"
CENTROID = "retrieval-centroid"
GATES = "phatgoose-gates"


class Library(Mapping[str, Module]):
    """Modules pulled from a hub, by candidate name (see the module docstring).

    Attributes:
        refs: ``{name: owner/name@version}``, the exact version of each module.
        computed: ``(name, transform)`` of every artifact this library computed (rather than read back).
    """

    def __init__(self, modules: dict[str, Module], refs: dict[str, str], host: nn.Module, derived: DerivedStore):
        self._modules, self.refs, self.host, self.derived = modules, refs, host, derived
        self.computed: list[tuple[str, str]] = []

    def __getitem__(self, name: str) -> Module:
        return self._modules[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)

    def __repr__(self) -> str:
        return f"Library({', '.join(f'{n}={r}' for n, r in self.refs.items())})"

    def attach(self, model: Any) -> list[str]:
        """``model.add`` every module under its candidate name; returns the names."""
        for name, module in self._modules.items():
            model.add(name, module)
        return list(self._modules)

    def mix(self, router: Router | None = None, aggregate: str = "sum") -> Mix:
        """A ``Mix`` over the whole library (attach it first)."""
        return Mix(list(self._modules), router=router, aggregate=aggregate)

    # -- derived artifacts --------------------------------------------------------------

    def _derive(self, name: str, transform: str, config: dict[str, Any], compute) -> dict[str, torch.Tensor]:
        sha = format.content_hash(self._modules[name])
        tensors, _, computed = self.derived.get_or_compute(sha, transform, config, compute, parent=self.refs[name])
        if computed:
            self.computed.append((name, transform))
        return tensors

    def artifacts(self, name: str) -> list[DerivedInfo]:
        """Every stored artifact derived from module ``name`` (its lineage downwards)."""
        return self.derived.of_module(format.content_hash(self._modules[name]))

    def prototypes(self) -> dict[str, dict[str, torch.Tensor]]:
        """Arrow prototypes ``{name: {site: (D_in,)}}``, read from the hub or computed once and stored."""
        layers = named_layers(self.host)
        out = {}
        for name, module in self._modules.items():
            config: dict[str, Any] = {"method": "svd-top1"}
            if any(isinstance(p, ReadsHostLayer) for p in module.parts.values()):  # ΔW reads the host weight
                config["host"] = _host_digest(layers, list(module.sites))
            out[name] = self._derive(name, ARROW, config, lambda m=module: arrow_prototypes(m, layers))
        return out

    def arrow(self, top_k: int = 3, temperature: float = 1.0) -> Arrow:
        """An :class:`~polymod.routing.arrow.Arrow` router given this library's stored prototypes."""
        router = Arrow(top_k=top_k, temperature=temperature)
        for name, protos in self.prototypes().items():
            router.provide(name, protos)
        return router

    def centroids(self, encoder: Encoder, examples: Mapping[str, Sequence[str]] | None = None
                  ) -> dict[str, torch.Tensor]:
        """Retrieval centroids ``{name: (d,)}`` under ``encoder``.

        A module's centroid is looked up by (content hash, encoder, examples digest);
        ``examples`` (a few training texts per module) are needed only to compute one.
        Without ``examples`` the newest centroid stored for the module under this encoder is used.

        Raises:
            StateError: a module has no stored centroid and no examples were given.
        """
        out = {}
        for name in self._modules:
            texts = (examples or {}).get(name)
            if texts:
                config = {"encoder": encoder_name(encoder), "examples": examples_digest(texts)}
                out[name] = self._derive(name, CENTROID, config, lambda t=texts: {"centroid": centroid(encoder, t)})
                out[name] = out[name]["centroid"]
                continue
            stored = [i for i in self.artifacts(name)
                      if i.transform == CENTROID and i.config.get("encoder") == encoder_name(encoder)]
            tensors = self.derived.load(stored[-1]) if stored else None
            if tensors is None:
                raise StateError(f"module {name!r} ({self.refs[name]}) has no retrieval centroid under encoder "
                                 f"{encoder_name(encoder)!r}; pass examples={{{name!r}: [a few training texts]}}")
            out[name] = tensors["centroid"]
        return out

    def retrieval(self, encoder: Encoder, top_k: int = 1,
                  examples: Mapping[str, Sequence[str]] | None = None) -> Retrieval:
        """A :class:`~polymod.routing.retrieval.Retrieval` router with this library's centroids."""
        router = Retrieval(top_k=top_k, encoder=encoder)
        router.provide_all(self.centroids(encoder, examples))
        return router


    def store_gates(self, name: str, gates: Mapping[str, torch.Tensor], config: dict[str, Any]) -> DerivedInfo:
        """Publish module ``name``'s PHATGOOSE gates (``{site: (D_in,)}``, from ``train_gates``) beside it."""
        sha = format.content_hash(self._modules[name])
        return self.derived.put(sha, GATES, config, dict(gates), parent=self.refs[name])

    def phatgoose(self, top_k: int = 2) -> Phatgoose:
        """A :class:`~polymod.routing.phatgoose.Phatgoose` router with every module's newest stored gates.

        Raises:
            StateError: a module has no stored gates.
        """
        router = Phatgoose(top_k=top_k)
        for name in self._modules:
            stored = [i for i in self.artifacts(name) if i.transform == GATES]
            tensors = self.derived.load(stored[-1]) if stored else None
            if tensors is None:
                raise StateError(f"module {name!r} ({self.refs[name]}) has no PHATGOOSE gates; train them with "
                                 "polymod.training.recipes.phatgoose.train_gates and publish them with "
                                 "Library.store_gates")
            router.provide(name, tensors)
        return router


def _host_digest(layers: Mapping[str, nn.Module], sites: list[str]) -> str:
    """sha256 over the host weights at ``sites`` (IA³'s ΔW, hence its prototype, depends on them)."""
    h = hashlib.sha256()
    for site in sites:
        weight = getattr(layers.get(site), "weight", None)
        if isinstance(weight, torch.Tensor):
            h.update(format.tensor_sha256(weight).encode())
    return h.hexdigest()


def _candidate_name(ref: names.Ref, taken: set[str]) -> str:
    name = ref.name if ref.name not in taken else f"{ref.owner}-{ref.name}"
    return name.replace(".", "-")


def library(source: str | Sequence[str], host: nn.Module, *, hub: HubLike = None, token: str | None = None,
            limit: int = 20, store: Any = None, **facets: str) -> Library:
    """Pull a library of modules that fit ``host``.

    Args:
        source: a free-text search query (the latest version of each hit), or a list of
            references ``owner/name[@version]``.
        host: the host the modules must fit (checked per module; a module that does not fit is an error).
        hub: where the modules live (URL, directory, or None for the default).
        token: the token for a remote hub.
        limit: at most this many search hits.
        store: where derived artifacts are kept instead of the hub: default the local hub's own
            store; for a hub URL, the hub itself (:class:`~polymod.hub.derived_remote.RemoteDerivedStore`:
            pulled with the modules, computed ones cached locally and pushed when ``token`` allows).
        **facets: search filters (``kind``, ``architecture``, ``task``, ``language``, ``tag``, ``owner``).

    Returns:
        A :class:`Library` named by module name (``owner-name`` when two owners share a name).

    Raises:
        ConfigError: an empty list, facets with a list of references, or a query with no hits.
        IncompatibleHostError: a module does not fit ``host`` (the message names the module and every difference).
    """
    client = connect(hub, token)
    if isinstance(source, str):
        found = client.search(source, limit=limit, **facets)
        refs = [f"{h['owner']}/{h['name']}@{h['version']}" for h in found.hits]
        if not refs:
            raise ConfigError(f"no module in {client} matches {source!r} with {facets or 'no filters'}; "
                              "search with pm.hub.search first, or pass a list of references")
    else:
        if facets:
            raise ConfigError(f"filters {sorted(facets)} apply to a search query, not to a list of references")
        refs = list(source)
        if not refs:
            raise ConfigError("library() needs a search query or at least one module reference")
    modules, exact = {}, {}
    for ref in refs:
        info = client.show(ref)
        path = client.pull(info.ref)
        format.require_fit(format.read_card(path), host, info.ref)
        name = _candidate_name(names.Ref.parse(info.ref), set(modules))
        modules[name], exact[name] = format.load(path), info.ref
    if store is not None or isinstance(client, LocalHub):
        derived = DerivedStore(store if store is not None else client.store)
    else:  # a hub URL: artifacts are pulled from it, computed artifacts pushed to it (with a token)
        derived = RemoteDerivedStore(client)
    return Library(modules, exact, host, derived)
