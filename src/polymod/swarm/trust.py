"""Which hosts a remote module trusts, and how their answers are checked.

Remote outputs are unauthenticated: a host can return anything. A :class:`Binding`
(one per attached :class:`~polymod.swarm.remote.Remote`) therefore

* accepts only announcements that are validly signed (the DHT's
  ``RSASignatureValidator``), well formed, and whose expert ids derive from the
  content hash they declare (:meth:`~polymod.swarm.records.Announcement.check`);
* with ``owner=``, only those of the pinned owner key (fingerprint) or peer id — libp2p
  authenticates peer ids, so a pinned call reaches the owner's process and no other;
* with ``verify=``, checks that share of the calls: recomputed locally when the weights are
  public or the user holds a copy, else asked again of a second host of the same content
  (and of a third to break a disagreement). A host whose answer differs by more than
  ``tolerance`` from the local result (or from the two others) is **quarantined**: it gets
  no further calls, the call is answered from the trusted result, and
  :func:`polymod.swarm.report` lists the host and the difference. Two hosts that disagree
  with no third to decide drop the call and are reported, not quarantined.

Only tensors travel (hivemind's protobuf tensor messages); nothing received is unpickled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from polymod.errors import ConfigError, IntegrityError, UnknownModuleError
from polymod.format import content_hash, load
from polymod.hub import api as hub_api
from polymod.modules.contract import Module
from polymod.swarm.peer import Swarm
from polymod.swarm.records import Announcement


@dataclass
class Hosting:
    """One host of the module: its owner fingerprint, its record and when it may be asked again."""

    owner: str
    record: Announcement
    down_until: float = 0.0

    @property
    def peer_id(self) -> str:
        """The host's libp2p peer id."""
        return self.record.peer_id


@dataclass
class CallLog:
    """The outcome of every remote call since the last :meth:`clear`."""

    answered: Counter = field(default_factory=Counter)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    verified: int = 0

    def summary(self) -> dict[str, Any]:
        """Calls made, answers per peer, drops with their reasons, verified calls and median latency (ms)."""
        ordered = sorted(self.seconds)
        return {"calls": sum(self.answered.values()) + len(self.dropped), "answered": dict(self.answered),
                "dropped": list(self.dropped), "verified": self.verified,
                "p50_ms": 1e3 * ordered[len(ordered) // 2] if ordered else None}

    def clear(self) -> None:
        """Forget every recorded call."""
        self.answered.clear()
        self.dropped.clear()
        self.seconds.clear()
        self.verified = 0


@dataclass
class Pending:
    """A call in flight: the host asked (None: no host available), the tensors sent, the future."""

    index: int
    tensors: list[torch.Tensor]
    host: Hosting | None
    future: Any
    start: float
    reason: str = ""


class Binding:
    """The resolved hosts, local weights and call log of one remote module (see the module docstring)."""

    def __init__(self, spec: Any, swarm: Swarm, hosts: list[Hosting], refused: dict[str, str],
                 local: Module | None, runs_locally: bool):
        self.spec, self.swarm, self.hosts, self.refused = spec, swarm, hosts, refused
        self.record = hosts[0].record
        self.local, self.runs_locally = local, runs_locally
        self.log = CallLog()
        self._rng = random.Random(spec.seed)
        self._next = 0
        self._looked = time.monotonic()  # when the DHT was last asked for hosts

    @classmethod
    def resolve(cls, spec: Any, swarm: Swarm, found: dict[str, Announcement], refused: dict[str, str]) -> Binding:
        """Choose the hosts and the content for ``spec`` among the announcements ``found``.

        Raises:
            UnknownModuleError: no acceptable host (the message says what was found and refused).
            IntegrityError: pulled or given weights do not have the announced content hash.
            ConfigError: ``run="local"`` or ``verify`` without weights to run.
        """
        hosts = [Hosting(owner, record) for owner, record in sorted(found.items())]
        if spec.owner is not None:
            hosts = [h for h in hosts if spec.owner in (h.owner, h.peer_id)]
        if spec.content_hash is not None:
            hosts = [h for h in hosts if h.record.content_hash == spec.content_hash]
        hosts = [h for h in hosts if h.peer_id not in swarm.quarantined]
        if not hosts:
            why = "; ".join(f"{o}: {r}" for o, r in refused.items()) or "none"
            pins = ", ".join(f"{k}={v!r}" for k, v in (("owner", spec.owner), ("content_hash", spec.content_hash))
                             if v is not None) or "no pins"
            raise UnknownModuleError(
                f"no acceptable host of {spec.ref!r} in the swarm ({len(found)} announcement(s) found, {pins}; "
                f"refused: {why}). Start one with `polymod host {spec.ref}`, or check the pins")
        counts = Counter(h.record.content_hash for h in hosts)
        chosen = max(counts, key=lambda c: (counts[c], max(h.record.time for h in hosts if h.record.content_hash == c)))
        hosts = [h for h in hosts if h.record.content_hash == chosen]
        record = hosts[0].record
        public_small = record.public and (spec.run == "local" or record.size_bytes <= spec.pull_limit)
        runs_locally = spec.run == "local" or (spec.run == "auto" and public_small)
        if spec.run == "local" and not record.public:
            raise ConfigError(f"Remote({spec.ref!r}, run='local'): its host does not announce the weights as "
                              "public; use run='remote' (or 'auto')")
        local = None
        if spec.weights is not None:
            local = _checked(load(spec.weights), record, f"weights at {spec.weights}")
        elif (runs_locally or spec.verify > 0) and record.public:
            path = hub_api.pull(f"{record.ref}@{record.version}" if record.version else record.ref, hub=record.hub)
            local = _checked(load(path), record, f"the pulled {record.ref}")
        if spec.verify > 0 and local is None and len(hosts) < 2:
            raise ConfigError(f"Remote({spec.ref!r}, verify={spec.verify}) checks calls against the weights or "
                              "against a second host: the host does not announce the weights public and is the "
                              "only one; pass weights=<package dir>")
        if local is not None:
            local.eval()
        return cls(spec, swarm, hosts, refused, local, runs_locally and local is not None)

    # -- calls ---------------------------------------------------------------------------

    def _pick(self) -> Hosting | None:
        """The next host that is neither quarantined nor resting after a failure (round robin)."""
        now = time.monotonic()
        ready = [h for h in self.hosts if h.peer_id not in self.swarm.quarantined and h.down_until <= now]
        if not ready and now - self._looked >= self.spec.retry_after:
            self.rediscover()
            ready = [h for h in self.hosts if h.peer_id not in self.swarm.quarantined and h.down_until <= now]
        if not ready:
            return None
        self._next = (self._next + 1) % len(ready)
        return ready[self._next]

    def rediscover(self) -> int:
        """Ask the DHT again for hosts of the same content (same pins); returns how many new ones were added.

        Runs when every known host is resting or quarantined, at most once per ``retry_after`` seconds: a host
        that restarted (new peer id) or a new replica is found without re-attaching the module.
        """
        self._looked = time.monotonic()
        try:
            found, refused = self.swarm.lookup(self.spec.ref)
        except Exception:  # the DHT itself is unreachable: keep what is known
            return 0
        self.refused.update(refused)
        known = {h.peer_id for h in self.hosts}
        added = [Hosting(owner, record) for owner, record in sorted(found.items())
                 if record.content_hash == self.record.content_hash and record.peer_id not in known
                 and (self.spec.owner is None or self.spec.owner in (owner, record.peer_id))]
        self.hosts.extend(added)
        return len(added)

    def start(self, index: int, tensors: list[torch.Tensor]) -> Pending:
        """Send site ``index``'s rows to a host; returns at once (see :meth:`finish`)."""
        host = self._pick()
        if host is None:
            return Pending(index, tensors, None, None, time.perf_counter(), "no host available (all failed "
                           "recently or quarantined)")
        uid = self.record.sites[index].uid
        return Pending(index, tensors, host, self.swarm.call(host.peer_id, uid, tensors, self.spec.timeout),
                       time.perf_counter())

    def finish(self, pending: Pending) -> torch.Tensor | None:
        """Wait for a call (bounded by its deadline): Δy rows, or None when the call is dropped."""
        site = self.record.sites[pending.index]
        host = pending.host
        if host is None:
            self.log.dropped.append({"peer": None, "site": site.name, "reason": pending.reason})
            return None
        try:
            delta = pending.future.result(self.spec.timeout + 1.0)[0]
        except Exception as exc:  # timeout, daemon error, host gone, bad answer: the call is dropped
            pending.future.cancel()
            host.down_until = time.monotonic() + self.spec.retry_after
            timeouts = (TimeoutError, asyncio.TimeoutError, concurrent.futures.TimeoutError)
            reason = "timeout" if isinstance(exc, timeouts) else f"{type(exc).__name__}: {str(exc)[:120]}"
            self.log.dropped.append({"peer": host.peer_id, "site": site.name, "reason": reason})
            return None
        self.log.seconds.append(time.perf_counter() - pending.start)
        rows = pending.tensors[0].shape[0]
        if delta.shape != (rows, site.out_features) or not delta.is_floating_point():
            self.swarm.quarantined[host.peer_id] = (f"answered {tuple(delta.shape)} {delta.dtype} for "
                                                    f"{rows} rows at {site.name}")
            self.log.dropped.append({"peer": host.peer_id, "site": site.name, "reason": "malformed answer"})
            return None
        if self.spec.verify > 0 and self._rng.random() < self.spec.verify:
            if self.local is not None:
                return self._verify(pending, host, delta)
            return self._cross_check(pending, host, delta)
        self.log.answered[host.peer_id] += 1
        return delta

    def _verify(self, pending: Pending, host: Hosting, delta: torch.Tensor) -> torch.Tensor:
        """Recompute the call locally; quarantine the host when its answer differs."""
        site = self.record.sites[pending.index]
        x = pending.tensors[0]
        y = pending.tensors[1] if site.reads_output else x.new_empty((x.shape[0], site.out_features),
                                                                    dtype=delta.dtype)
        with torch.no_grad():
            expected = self.local.part(site.name)(x, y)  # (N, D_out)
        self.log.verified += 1
        diff = float((expected - delta).abs().max()) if delta.numel() else 0.0
        if diff > self.spec.tolerance:
            self.swarm.quarantined[host.peer_id] = f"max |Δ| {diff:.3g} > {self.spec.tolerance:g} at {site.name}"
            self.log.dropped.append({"peer": host.peer_id, "site": site.name,
                                     "reason": f"wrong output (max |Δ| {diff:.3g}): quarantined"})
            return expected
        self.log.answered[host.peer_id] += 1
        return delta

    def _cross_check(self, pending: Pending, host: Hosting, delta: torch.Tensor) -> torch.Tensor | None:
        """Ask a second host the same rows (a third on disagreement); quarantine the odd one out."""
        site = self.record.sites[pending.index].name
        others = [h for h in self.hosts if h is not host and h.peer_id not in self.swarm.quarantined
                  and h.down_until <= time.monotonic()]
        second = _ask(self, others[0], pending) if others else None
        if second is None:  # nobody to compare with: accepted unchecked
            self.log.answered[host.peer_id] += 1
            return delta
        self.log.verified += 1
        tol = self.spec.tolerance
        if _close(delta, second, tol):
            self.log.answered[host.peer_id] += 1
            return delta
        third = _ask(self, others[1], pending) if len(others) > 1 else None
        for odd, trusted, answer in ((others[0], host, delta), (host, others[0], second)):
            if _close(third, answer, tol):
                diff = float((delta - second).abs().max())
                self.swarm.quarantined[odd.peer_id] = f"disagreed with two hosts by max |Δ| {diff:.3g} at {site}"
                self.log.answered[trusted.peer_id] += 1
                return answer
        self.log.dropped.append({"peer": host.peer_id, "site": site,
                                 "reason": f"hosts disagree ({host.peer_id} vs {others[0].peer_id}), no majority"})
        return None


def _ask(binding: Binding, host: Hosting, pending: Pending) -> torch.Tensor | None:
    """The same rows asked of another host (None when it fails)."""
    uid = binding.record.sites[pending.index].uid
    try:
        return binding.swarm.call(host.peer_id, uid, pending.tensors, binding.spec.timeout).result(
            binding.spec.timeout + 1.0)[0]
    except Exception:  # an unreachable second opinion checks nothing
        return None


def _close(a: torch.Tensor | None, b: torch.Tensor | None, tolerance: float) -> bool:
    return a is not None and b is not None and a.shape == b.shape and float((a - b).abs().max()) <= tolerance


def _checked(module: Module, record: Announcement, label: str) -> Module:
    digest = content_hash(module)
    if digest != record.content_hash:
        raise IntegrityError(f"{label} has content hash {digest[:12]}…, the hosts announce "
                             f"{record.content_hash[:12]}…: not the same module")
    return module
