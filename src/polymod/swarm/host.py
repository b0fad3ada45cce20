"""Hosting a module: each site function served as a stateless expert, announced with signed records.

A module's part at one site computes the contribution ``Δy = f_φ(x, y)`` there (the
module contract, :mod:`polymod.modules.contract`). A host serves exactly that function,
on rows: the client flattens the tokens of a site's input to ``(N, D_in)`` (and, for
kinds whose Δy reads the host output, ``y`` to ``(N, D_out)``) and receives ``Δy``
``(N, D_out)``. The frozen host network never leaves the client: only the module's
function runs here, so a host needs the module's weights and nothing else.

Each site becomes a ``hivemind.moe.server.ModuleBackend`` behind one
``hivemind.moe.Server``; the expert ids derive from the module's content hash
(:func:`polymod.swarm.records.expert_uid`). :meth:`Host.refresh` re-announces the
signed :class:`~polymod.swarm.records.Announcement` and the peer entry before they
expire; :mod:`polymod.swarm.process` runs a host in its own supervised process tree.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from typing import Any

import torch
from torch import nn

from polymod.errors import IncompatibleHostError, StateError
from polymod.format import content_hash
from polymod.modules.contract import Module, ReadsRoutingInputs
from polymod.modules.lora import LoRAPart
from polymod.sites import is_input_site
from polymod.swarm.peer import Swarm
from polymod.swarm.records import Announcement, HostedSite, expert_uid

MAX_ROWS = 1 << 16  # rows of one request at most (a client splits larger batches)
_X_ONLY = (LoRAPart,)  # parts whose Δy reads only the site input: y is not sent


def hosted_sites(module: Module, digest: str) -> list[HostedSite]:
    """Describe every site function of ``module`` as an expert (id, input shape and dtype, output width).

    Raises:
        IncompatibleHostError: a site cannot be served remotely (an input site, or a part that
            reads the host layer or the per-call routing inputs, which live on the client).
    """
    out = []
    for i, (name, part) in enumerate(module.items()):
        site = module.sites[name]
        why = None
        if is_input_site(name):
            why = "input sites (prompts, prefixes) change the host's call itself"
        elif isinstance(part, ReadsRoutingInputs):
            why = "its Δy reads the per-call routing inputs of the client"
        embedding = site.kind == "embedding"
        hosted = HostedSite(name=name, kind=site.kind, uid=expert_uid(digest, i),
                            x_shape=[] if embedding else [int(site.in_features)],
                            x_dtype="int64" if embedding else _dtype_name(_dtype(module)),
                            out_features=int(site.out_features), reads_output=not isinstance(part, _X_ONLY))
        if why is None:
            why = _probe(part, hosted)
        if why:
            raise IncompatibleHostError(f"a {module.kind} module cannot be hosted remotely at {name!r}: {why}; "
                                        "publish it on the hub so that clients pull and run it locally")
        out.append(hosted)
    return out


def _probe(part: nn.Module, site: HostedSite) -> str | None:
    """Why ``part`` cannot compute Δy from rows alone (without the host layer), or None when it can."""
    dtype = _dtype_of(site.x_dtype)
    x = torch.zeros((2, *site.x_shape), dtype=dtype)
    y = torch.zeros((2, site.out_features), dtype=_dtype(part))
    try:
        with torch.no_grad():
            delta = part(x, y)
    except Exception as exc:  # a part that needs the host layer (IA³ scaling a layer's input) fails here
        return f"its Δy cannot be computed from the site's rows alone ({type(exc).__name__}: {exc})"
    if not isinstance(delta, torch.Tensor) or tuple(delta.shape) != (2, site.out_features):
        return f"its Δy on rows is not a (rows, {site.out_features}) tensor"
    return None


def _dtype(module: nn.Module) -> torch.dtype:
    return next((p.dtype for p in module.parameters() if p.is_floating_point()), torch.float32)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SiteFunction(nn.Module):
    """One part as a row function: ``(x (N, …)[, y (N, D_out)]) -> Δy (N, D_out)``; counts its calls."""

    def __init__(self, part: nn.Module, out_features: int, reads_output: bool):
        super().__init__()
        self.part = part
        self.out_features = out_features
        self.reads_output = reads_output
        self.rows = 0

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Δy of the part on ``x`` (and ``y``, when the part reads the host output)."""
        self.rows += x.shape[0]
        if y is None:  # x-only parts never read y: an empty stand-in of the right shape
            y = x.new_empty((x.shape[0], self.out_features), dtype=_dtype(self))
        return self.part(x, y)  # (N, D_out)


def _dtype_of(name: str) -> torch.dtype:
    value = getattr(torch, name, None)
    if not isinstance(value, torch.dtype):
        raise StateError(f"unknown dtype {name!r} in a hosted site")
    return value


def backends(module: Module, sites: list[HostedSite]) -> tuple[dict[str, Any], list[SiteFunction]]:
    """One ``ModuleBackend`` per hosted site (and the row functions they run)."""
    from hivemind.moe.server import ModuleBackend
    from hivemind.utils.tensor_descr import BatchTensorDescriptor

    out, functions = {}, []
    module.eval()
    for site in sites:
        fn = SiteFunction(module.part(site.name), site.out_features, site.reads_output)
        args = [BatchTensorDescriptor(*site.x_shape, dtype=_dtype_of(site.x_dtype))]
        if site.reads_output:
            args.append(BatchTensorDescriptor(site.out_features, dtype=_dtype(module)))
        out[site.uid] = ModuleBackend(name=site.uid, module=fn, args_schema=tuple(args),
                                      outputs_schema=BatchTensorDescriptor(site.out_features, dtype=_dtype(module)),
                                      max_batch_size=MAX_ROWS)
        functions.append(fn)
    return out, functions


class Host:
    """Serve one module's site functions in this process (see the module docstring).

    Args:
        module: the module to serve (loaded; its weights stay here).
        ref: its ``owner/name`` (a hub reference, or the name given to a local directory).
        swarm: this host's swarm node (its owner key signs the announcements).
        version: the hub version served, if any.
        public: whether the weights can be pulled from ``hub``.
        hub: the hub URL, when public.
        ttl: seconds a record lives; :meth:`refresh` must run more often (every ``ttl / 3``).
    """

    def __init__(self, module: Module, ref: str, swarm: Swarm, *, version: str | None = None,
                 public: bool = False, hub: str | None = None, ttl: float = 30.0):
        self.module, self.swarm, self.ttl = module, swarm, ttl
        digest = content_hash(module)
        self.sites = hosted_sites(module, digest)
        size = sum(p.numel() * p.element_size() for p in module.parameters())
        card = module.card
        self.record = Announcement(ref=ref, content_hash=digest, peer_id=swarm.peer_id, sites=self.sites,
                                   dtype=_dtype_name(_dtype(module)), kind=module.kind, version=version,
                                   license=card.license, host_fingerprint=dict(card.host or {}),
                                   public=public, hub=hub if public else None, size_bytes=int(size))
        self.server: Any = None
        self._functions: list[SiteFunction] = []
        self._rows_seen, self._last = 0, time.monotonic()

    def start(self, timeout: float = 60.0) -> None:
        """Start the expert server and announce; returns when requests can be served.

        Raises:
            StateError: the server did not become ready in ``timeout`` seconds.
        """
        from hivemind.moe.server import Server

        tempfile.gettempdir()  # a fork while another thread first fills tempfile's cache can deadlock the child
        served, self._functions = backends(self.module, self.sites)
        self.server = Server(self.swarm.dht, served, num_connection_handlers=1, update_period=self.ttl / 3)
        self.server.start()
        if not self.server.ready.wait(timeout):
            raise StateError(f"the expert server did not become ready in {timeout:g} s")
        self.refresh()

    def refresh(self) -> bool:
        """Re-announce the module and the peer entry (with the rows served per second since the last refresh)."""
        now = time.monotonic()
        rows = sum(f.rows for f in self._functions)
        load = (rows - self._rows_seen) / max(now - self._last, 1e-3)
        self._rows_seen, self._last = rows, now
        record = Announcement(**{**self.record.__dict__, "load": load, "time": time.time()})
        ok = self.swarm.announce(record, self.ttl)
        self.swarm.announce_peer([f"{record.ref}@{record.content_hash[:12]}"], load, self.ttl)
        return ok

    def serve_forever(self, stop: threading.Event, parent_pid: int | None = None) -> None:
        """Refresh the records every ``ttl / 3`` s until ``stop`` is set or the parent process is gone."""
        while not stop.wait(self.ttl / 3):
            if parent_pid is not None and os.getppid() != parent_pid:
                break  # the supervisor died: do not keep serving unsupervised
            self.refresh()

    def shutdown(self) -> None:
        """Stop serving (the records expire after ``ttl``)."""
        if self.server is not None:
            self.server.shutdown()
            # the server thread shuts down once more as its runtime returns: wait for it, so that its last log
            # lines are written while the caller's streams are still open
            self.server.join(10)
            self.server = None
