"""``pm.Remote``: a module whose site functions run on other peers' machines.

``model.add("x", pm.Remote("owner/name", dht=swarm))`` looks the module up in the
swarm's DHT and attaches one :class:`RemotePart` per hosted site. A part's
``Δy = f_φ(x, y)`` is a call to the host serving that site, so a remote module takes
part in every composition like a local one (``Stack``, ``Mix`` with any router,
per-row routing). Each call

* sends only rows: the site's tokens flattened to ``(N, D_in)`` — in a ``Mix`` only the
  rows routed to that expert, all of a step's rows in one call per site
  (:mod:`polymod.swarm.mixer`);
* has its own deadline (``timeout``): hivemind's ``RemoteExpert`` has none;
* fails soft: a host that errs or misses the deadline is *dropped* for that call (its
  contribution is zero; in a Mix the remaining weights are renormalised) and is not
  asked again for ``retry_after`` seconds; another host of the same content, if any,
  answers the next call. :func:`polymod.swarm.report` says who answered and who dropped.

**Pull or call** (``run=``): a remote call costs milliseconds to tens of milliseconds per
routed site per decoding step (see docs/swarm.md), a download of a small module costs
once. ``run="auto"`` (the default) therefore pulls the weights and runs the module locally
when its host announces them public and they are at most ``pull_limit`` bytes;
``run="remote"`` always calls; ``run="local"`` always pulls (an error when not public).

**Trust** (:mod:`polymod.swarm.trust`): ``owner=`` pins the owner key (fingerprint) or
peer id a host must have; ``verify=`` recomputes that share of the calls locally when
the weights are available and quarantines hosts that disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from polymod.card import Card
from polymod.errors import ConfigError, IncompatibleHostError, UnknownModuleError
from polymod.format import require_fit
from polymod.modules.contract import register
from polymod.sites import Site
from polymod.swarm.peer import Swarm, join
from polymod.swarm.records import Announcement, base_ref
from polymod.swarm.trust import Binding

_JOINED: dict[tuple[str, ...], Swarm] = {}  # one client node per list of bootstrap addresses, shared by specs


def _swarm(dht: Any) -> Swarm:
    if isinstance(dht, Swarm):
        return dht
    if isinstance(dht, str):
        dht = [dht]
    if isinstance(dht, Sequence) and dht and all(isinstance(a, str) for a in dht):
        key = tuple(dht)
        if key not in _JOINED:
            _JOINED[key] = join(list(key))
        return _JOINED[key]
    raise ConfigError(f"Remote(dht=...) takes a Swarm (pm.swarm.join(...)) or peer multiaddrs, got {dht!r}")


@register
@dataclass(frozen=True)
class Remote:
    """A module hosted by other peers (see the module docstring).

    Args:
        ref: ``owner/name`` (optionally ``@version``, informative) as announced by its hosts.
        dht: the swarm: a :class:`~polymod.swarm.peer.Swarm` or the multiaddr(s) of a peer in it.
        owner: pin hosts to this owner fingerprint (``polymod swarm ls`` shows it) or libp2p peer id;
            None accepts any host whose record is validly signed and bound to its content hash.
        content_hash: pin the module content (sha256 of its weights); None takes the content that
            the pinned owner (or, unpinned, the most hosts) serves.
        timeout: deadline of each remote call in seconds.
        retry_after: seconds a host that failed a call is left alone.
        run: ``auto`` (pull when public and at most ``pull_limit`` bytes, else call), ``remote``, ``local``.
        pull_limit: the largest weights ``run="auto"`` pulls, in bytes.
        verify: share of calls (0–1) recomputed locally to check the host (needs the weights: public,
            or ``weights``).
        weights: a local copy of the module (a package directory) for ``verify`` when it is not public.
        tolerance: largest absolute difference a verified output may have.
        seed: seed of the verification sampling.
    """

    kind: ClassVar[str] = "remote"
    ref: str = ""
    dht: Any = None
    owner: str | None = None
    content_hash: str | None = None
    timeout: float = 2.0
    retry_after: float = 10.0
    run: Literal["auto", "remote", "local"] = "auto"
    pull_limit: int = 16 << 20
    verify: float = 0.0
    weights: str | None = None
    tolerance: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        base_ref(self.ref)
        if self.dht is None:
            raise ConfigError("Remote needs dht=: a Swarm (pm.swarm.join('<multiaddr>')) or a peer's multiaddr")
        if not (isinstance(self.timeout, (int, float)) and self.timeout > 0):
            raise ConfigError(f"Remote timeout must be positive seconds, got {self.timeout!r}")
        if self.run not in ("auto", "remote", "local"):
            raise ConfigError(f"Remote run must be 'auto', 'remote' or 'local', got {self.run!r}")
        if not 0.0 <= self.verify <= 1.0:
            raise ConfigError(f"Remote verify is a share of calls in [0, 1], got {self.verify!r}")

    # -- resolution (once, at attach) --------------------------------------------------------

    def binding(self) -> Binding:
        """The resolved hosts and local weights of this module (looked up on first use)."""
        binding = self.__dict__.get("_binding")
        if binding is None:  # resolved state, not configuration: kept out of the fields (and the card)
            swarm = _swarm(self.dht)
            found, refused = swarm.lookup(self.ref)
            binding = Binding.resolve(self, swarm, found, refused)
            object.__setattr__(self, "_binding", binding)
        return binding

    @property
    def record(self) -> Announcement:
        """The announcement of the content this module runs."""
        return self.binding().record

    @property
    def sites(self) -> list[str]:
        """The hosted sites (from the announcement)."""
        return self.record.site_names

    def sites_for(self, host: nn.Module) -> list[str]:
        """The hosted sites, after checking the announced host fingerprint against ``host``.

        Raises:
            IncompatibleHostError: the module's sites are missing from ``host`` or differ in shape.
        """
        record = self.record
        card = Card(kind=record.kind, config={}, sites=record.site_names, host=record.host_fingerprint)
        require_fit(card, host, f"remote module {self.ref!r}")
        return record.site_names

    def check_site(self, site: Site) -> str | None:
        """Refuse a host site whose shape differs from the hosted one."""
        hosted = next(s for s in self.record.sites if s.name == site.name)
        if site.out_features != hosted.out_features:
            return f"the host's output width is {site.out_features}, the hosted function's {hosted.out_features}"
        return None

    def build_part(self, site: Site, layer: nn.Module | None) -> nn.Module:
        """The local part when the policy pulled the weights, else a :class:`RemotePart`."""
        binding = self.binding()
        if binding.local is not None and binding.runs_locally:
            return binding.local.part(site.name)
        index = binding.record.site_names.index(site.name)
        return RemotePart(binding, index)


class RemotePart(nn.Module):
    """One hosted site function seen from the client: ``Δy`` by a call with a deadline.

    A dropped call (error, timeout, wrong output caught by verification) contributes zero.
    """

    def __init__(self, binding: Binding, index: int):
        super().__init__()
        self.binding = binding
        self.index = index
        self.site = binding.record.sites[index]

    def rows(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The tensors to send for site input ``x`` and output ``y``: rows ``(N, …)``."""
        lead = y.shape[:-1]
        n = math.prod(lead)
        xs = x.reshape(n, *x.shape[len(lead):])
        xs = xs if self.site.x_dtype == "int64" else xs.to(getattr(torch, self.site.x_dtype))
        if not self.site.reads_output:
            return [xs]
        return [xs, y.reshape(n, y.shape[-1]).to(getattr(torch, self.binding.record.dtype))]

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Δy shaped like ``y`` (zeros when the call is dropped)."""
        pending = self.binding.start(self.index, self.rows(x, y))
        delta = self.binding.finish(pending)
        if delta is None:
            return torch.zeros_like(y)
        return delta.to(device=y.device, dtype=y.dtype).view(y.shape)

    def extra_repr(self) -> str:
        return f"uid={self.site.uid}, site={self.site.name}"


def remote_modules(model: nn.Module) -> dict[str, Binding]:
    """{name: binding} of every remote module attached to ``model`` (a :class:`~polymod.Modular`)."""
    library = getattr(model, "library", None)
    if library is None:
        raise UnknownModuleError(f"report() takes a Modular model, got {type(model).__name__}")
    out = {}
    for name, module in library.items():
        if isinstance(module.spec, Remote):
            out[name] = module.spec.binding()
    return out


def report(model: nn.Module, reset: bool = True) -> dict[str, Any]:
    """Who answered the remote calls since the last report, who was dropped and why.

    Returns:
        ``{module name: {"calls", "answered": {peer: calls}, "dropped": [{peer, site, reason}],
        "quarantined": {peer: why}, "local": bool}}``.

    Raises:
        UnknownModuleError: ``model`` is not a Modular model.
    """
    out = {}
    for name, binding in remote_modules(model).items():
        out[name] = binding.log.summary()
        out[name]["local"] = binding.runs_locally
        out[name]["quarantined"] = dict(binding.swarm.quarantined)
        if reset:
            binding.log.clear()
    if not out:
        raise IncompatibleHostError("no Remote module is attached to this model")
    return out
