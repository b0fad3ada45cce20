"""Helpers of the swarm tests: a stand-in swarm answering from local modules, and misbehaving hosts.

:class:`LocalSwarm` has the two things a :class:`~polymod.swarm.trust.Binding` uses from a
:class:`~polymod.swarm.peer.Swarm` (``call`` returning a future, ``quarantined``), answering
from local modules, so routing, renormalisation and verification are tested in the default
tier without hivemind. ``python -m tests.swarm_helpers MODE '<HostConfig JSON>'`` runs a real
host that is ``slow`` (every call sleeps 30 s) or ``wrong`` (answers with Δy + 0.5).
"""

from __future__ import annotations

import concurrent.futures
import sys
import time

import torch

import polymod as pm
from polymod.format import content_hash
from polymod.swarm.host import hosted_sites
from polymod.swarm.records import Announcement
from polymod.swarm.trust import Binding, Hosting

PEERS = ["12D3KooW" + c * 44 for c in "ABCDEFGH"]  # well-formed base58 peer ids


def announcement(module: pm.Module, ref: str, peer: str) -> Announcement:
    """The record an honest host of ``module`` would announce."""
    digest = content_hash(module)
    return Announcement(ref=ref, content_hash=digest, peer_id=peer, sites=hosted_sites(module, digest),
                        dtype="float32", kind=module.kind, host_fingerprint=dict(module.card.host))


class LocalSwarm:
    """Answers calls from local modules; peers in ``dead`` fail, in ``frozen`` never answer, in ``wrong`` lie."""

    def __init__(self) -> None:
        self.modules: dict[str, pm.Module] = {}  # uid prefix -> module
        self.dead: set[str] = set()
        self.frozen: set[str] = set()
        self.wrong: set[str] = set()
        self.quarantined: dict[str, str] = {}
        self.rows_sent: list[tuple[str, int]] = []
        self.records: dict[str, dict[str, Announcement]] = {}  # ref -> {owner: announcement}, for lookup()

    def lookup(self, ref: str) -> tuple[dict[str, Announcement], dict[str, str]]:
        return dict(self.records.get(ref, {})), {}

    def call(self, peer_id: str, uid: str, tensors: list[torch.Tensor], timeout: float) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.rows_sent.append((uid, tensors[0].shape[0]))
        if peer_id in self.frozen:
            return future  # never completes: the deadline must end the wait
        if peer_id in self.dead:
            future.set_exception(ConnectionError(f"failed to dial {peer_id}"))
            return future
        prefix, index = uid.split(".")
        module = self.modules[prefix]
        name = list(module.sites)[int(index)]
        x = tensors[0]
        y = tensors[1] if len(tensors) > 1 else x.new_empty((x.shape[0], module.sites[name].out_features))
        with torch.no_grad():
            delta = module.part(name)(x, y)
        future.set_result([delta + 0.5 if peer_id in self.wrong else delta])
        return future


def bind(spec: pm.Remote, swarm: LocalSwarm, module: pm.Module, peers: list[str],
         local: pm.Module | None = None) -> pm.Remote:
    """Resolve ``spec`` to hosts ``peers`` of ``module`` on ``swarm`` (what ``Remote.binding`` does on a DHT)."""
    hosts = [Hosting(f"owner{i}", announcement(module, spec.ref, p)) for i, p in enumerate(peers)]
    swarm.modules[hosts[0].record.sites[0].uid.split(".")[0]] = module
    object.__setattr__(spec, "_binding", Binding(spec, swarm, hosts, {}, local, False))
    return spec


def _slow(host: object) -> None:
    for _, part in host.module.items():
        forward = part.forward

        def sleepy(x: torch.Tensor, y: torch.Tensor, forward=forward) -> torch.Tensor:
            time.sleep(30)
            return forward(x, y)

        part.forward = sleepy


def _wrong(host: object) -> None:
    with torch.no_grad():
        for _, part in host.module.items():
            for p in part.parameters():
                p.add_(0.5)  # after the content hash was taken: the host announces one module and runs another


if __name__ == "__main__":
    from polymod.swarm.process import main

    main(sys.argv[2:], wrap={"slow": _slow, "wrong": _wrong, "honest": None}[sys.argv[1]])
