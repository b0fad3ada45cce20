"""A node of the swarm: a hivemind DHT whose records are signed, and calls to experts with deadlines.

:class:`Swarm` wraps one ``hivemind.DHT`` started with an
:class:`~hivemind.dht.crypto.RSASignatureValidator` holding this node's *owner key*
(an RSA key, kept in a file for hosts so that clients can pin it across restarts).
Records a node writes under its own owner marker are signed; every node runs the
validator, so a forged or foreign write to that subkey is refused where it would be
stored and where it is read.

hivemind is imported inside the functions that need it: ``import polymod`` must not
need the ``swarm`` extra, and hivemind forks its processes — CUDA must not be
initialised in a process before it starts a :class:`Swarm` (see docs/swarm.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polymod.errors import ConfigError, FormatError, StateError
from polymod.swarm.records import PEERS_KEY, Announcement, PeerEntry, module_key

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class SwarmUnavailableError(StateError):
    """hivemind is missing or cannot start on this machine (the message says why and what to do)."""


def require_hivemind() -> Any:
    """Import hivemind, or explain how to get it.

    Raises:
        SwarmUnavailableError: not installed, or the platform cannot run it (Windows: no ``fork``).
    """
    if sys.platform.startswith("win"):
        raise SwarmUnavailableError("the swarm runs on Linux (macOS: best effort): hivemind starts its DHT and "
                                    "servers as forked processes, which Windows does not have")
    try:
        import hivemind
    except ImportError as exc:
        raise SwarmUnavailableError(f"remote modules need hivemind ({exc}); install the extra: "
                                    "pip install 'polymod[swarm]'") from exc
    return hivemind


def owner_fingerprint(marker: bytes) -> str:
    """A short, printable id of an owner key: the first 16 hex digits of sha256 of its marker."""
    return hashlib.sha256(marker).hexdigest()[:16]


def load_owner_key(path: str | os.PathLike | None) -> Any:
    """An RSA owner key: read from ``path`` (DER, created with mode 0600 when missing), or a fresh one.

    Raises:
        FormatError: the file exists but is not an RSA private key.
    """
    require_hivemind()
    from hivemind.utils.crypto import RSAPrivateKey

    if path is None:
        return RSAPrivateKey()
    path = Path(path)
    if not path.exists():
        key = RSAPrivateKey()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key.to_bytes())
        return key
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    try:
        key.__setstate__({"_private_key": path.read_bytes()})  # hivemind's own (un)pickling of a key: DER bytes
    except ValueError as exc:
        raise FormatError(f"{path} is not an RSA private key in DER form ({exc}); move it away to make a new "
                          "one (clients that pinned the old owner fingerprint must pin the new one)") from exc
    return key


class Swarm:
    """One node of the swarm (a DHT peer with signed records); hosts and clients both hold one.

    Args:
        initial_peers: multiaddrs of peers already in the swarm (none: start a new swarm).
        host_maddrs: where to listen (default: loopback, a free port). Use ``/ip4/0.0.0.0/tcp/PORT``
            to accept peers from other machines.
        announce_maddrs: addresses other peers should dial (behind NAT: the public address).
        owner_key: the RSA owner key (:func:`load_owner_key`); a fresh one when None.
        client_mode: a client that only calls experts and reads records (no incoming connections).
        start_timeout: seconds to wait for the DHT to start.

    Raises:
        SwarmUnavailableError: hivemind is missing or cannot start in ``start_timeout``.
    """

    def __init__(self, initial_peers: Sequence[str] = (), *, host_maddrs: Sequence[str] | None = None,
                 announce_maddrs: Sequence[str] | None = None, owner_key: Any = None, client_mode: bool = False,
                 start_timeout: float = 30.0):
        hivemind = require_hivemind()
        from hivemind.dht.crypto import RSASignatureValidator
        from hivemind.utils.crypto import RSAPrivateKey

        self.validator = RSASignatureValidator(owner_key if owner_key is not None else RSAPrivateKey())
        kwargs: dict[str, Any] = {"host_maddrs": list(host_maddrs or [LOOPBACK]), "client_mode": client_mode}
        if announce_maddrs:
            kwargs["announce_maddrs"] = list(announce_maddrs)
        self.dht = hivemind.DHT(initial_peers=list(initial_peers) or None, start=False,
                                record_validators=[self.validator], **kwargs)
        try:
            self.dht.run_in_background(await_ready=True, timeout=start_timeout)
        except Exception as exc:  # TimeoutError, or the daemon's own error (unreachable peers, bad address)
            self.dht.shutdown()
            raise SwarmUnavailableError(f"the DHT did not start in {start_timeout:g} s (initial peers: "
                                        f"{list(initial_peers) or 'none'}): {type(exc).__name__}: {exc}; check "
                                        "that the peers are reachable and the addresses are multiaddrs") from exc
        self._p2p: Any = None
        self.quarantined: dict[str, str] = {}  # peer id -> why (see polymod.swarm.trust)

    def __repr__(self) -> str:
        return f"Swarm(peer_id={self.peer_id!r}, owner={self.owner!r})"

    # -- identity ------------------------------------------------------------------------

    @property
    def owner_marker(self) -> bytes:
        """This node's ``[owner:<public key>]`` subkey (records under it are signed)."""
        return self.validator.local_public_key

    @property
    def owner(self) -> str:
        """This node's owner fingerprint (what clients pin with ``Remote(..., owner=...)``)."""
        return owner_fingerprint(self.owner_marker)

    @property
    def peer_id(self) -> str:
        """This node's libp2p peer id (base58)."""
        return self.dht.peer_id.to_base58()

    @property
    def addresses(self) -> list[str]:
        """Multiaddrs other peers can join through (``--dht`` of ``polymod host``)."""
        return [str(a) for a in self.dht.get_visible_maddrs()]

    # -- records -------------------------------------------------------------------------

    def announce(self, record: Announcement, ttl: float) -> bool:
        """Store ``record`` (signed, under this node's owner marker) for ``ttl`` seconds."""
        from hivemind.utils import get_dht_time

        return bool(self.dht.store(module_key(record.ref), record.to_dict(), get_dht_time() + ttl,
                                   subkey=self.owner_marker))

    def announce_peer(self, modules: list[str], load: float, ttl: float) -> bool:
        """List this node under :data:`PEERS_KEY` (for ``polymod swarm ls``)."""
        from hivemind.utils import get_dht_time

        value = {"peer_id": self.peer_id, "modules": modules, "load": float(load), "time": time.time()}
        return bool(self.dht.store(PEERS_KEY, value, get_dht_time() + ttl, subkey=self.owner_marker))

    def _entries(self, key: str) -> dict[str, Any]:
        """{owner fingerprint: value} of every valid subkey of ``key`` (signatures checked by the DHT)."""
        found = self.dht.get(key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return {}
        out = {}
        for subkey, item in found.value.items():
            if not isinstance(subkey, bytes) or not subkey.startswith(b"[owner:"):
                continue  # unsigned subkeys prove nothing about who wrote them
            out[owner_fingerprint(subkey)] = item.value
        return out

    def lookup(self, ref: str) -> tuple[dict[str, Announcement], dict[str, str]]:
        """Every host of ``ref`` found in the DHT.

        Returns:
            ({owner fingerprint: announcement}, {owner fingerprint: why its record was refused}).
        """
        good, refused = {}, {}
        for owner, value in self._entries(module_key(ref)).items():
            try:
                good[owner] = Announcement.from_dict(value)
            except FormatError as exc:
                refused[owner] = str(exc)
        return good, refused

    def peers(self) -> dict[str, PeerEntry]:
        """{owner fingerprint: entry} of every peer listed under :data:`PEERS_KEY`."""
        out = {}
        for owner, value in self._entries(PEERS_KEY).items():
            try:
                out[owner] = PeerEntry.from_dict(value)
            except FormatError:
                continue
        return out

    # -- calls ---------------------------------------------------------------------------

    @property
    def p2p(self) -> Any:
        """This process's replica of the DHT's libp2p node (for calls to experts)."""
        if self._p2p is None:
            from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

            self._p2p = RemoteExpertWorker.run_coroutine(self.dht.replicate_p2p())
        return self._p2p

    def call(self, peer_id: str, uid: str, tensors: Sequence[torch.Tensor],
             timeout: float) -> concurrent.futures.Future:
        """Start a forward call of expert ``uid`` on ``peer_id``; the future fails after ``timeout`` seconds.

        hivemind's ``RemoteExpert`` has no deadline (a frozen host blocks the caller for ever), so
        the call runs here with its own: ``asyncio.wait_for`` on the request. Only tensors travel,
        serialised by hivemind's protobuf tensor format (no pickle).
        """
        from hivemind.compression import serialize_torch_tensor
        from hivemind.moe.client.expert import expert_forward, get_server_stub
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from hivemind.p2p import PeerID

        stub = get_server_stub(self.p2p, PeerID.from_base58(peer_id))
        tensors = [t.detach().to("cpu").contiguous() for t in tensors]
        serialized = [serialize_torch_tensor(t) for t in tensors]

        async def run() -> list[torch.Tensor]:
            return await asyncio.wait_for(expert_forward(uid, tensors, serialized, stub), timeout)

        return RemoteExpertWorker.run_coroutine(run(), return_future=True)

    def ping(self, peer_id: str, uid: str, timeout: float = 2.0) -> float:
        """Round-trip seconds of an ``rpc_info`` request to expert ``uid`` on ``peer_id``.

        Raises:
            TimeoutError: no answer in ``timeout`` seconds.
        """
        from hivemind.moe.client.expert import get_server_stub
        from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
        from hivemind.p2p import PeerID
        from hivemind.proto import runtime_pb2

        stub = get_server_stub(self.p2p, PeerID.from_base58(peer_id))
        start = time.perf_counter()
        coro = asyncio.wait_for(stub.rpc_info(runtime_pb2.ExpertUID(uid=uid)), timeout)
        RemoteExpertWorker.run_coroutine(coro, return_future=True).result(timeout + 1.0)
        return time.perf_counter() - start

    def shutdown(self) -> None:
        """Leave the swarm: close this process's libp2p replica in its own event loop, stop the DHT process.

        Without this, the replica's finalizers run at garbage collection in a thread with no event
        loop and raise (hivemind's exit noise), which can also break code running at that moment.
        """
        if self._p2p is not None:
            from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker

            p2p, self._p2p = self._p2p, None

            async def close() -> None:
                await p2p.shutdown()
                await asyncio.sleep(0.05)  # let the cancelled reader/writer tasks finish

            try:
                RemoteExpertWorker.run_coroutine(close(), return_future=True).result(10)
            except Exception:  # a daemon already gone: nothing left to close
                pass
        self.dht.shutdown()

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def join(initial_peers: str | Sequence[str], **kwargs: Any) -> Swarm:
    """Join a swarm as a client (:class:`Swarm` with ``client_mode=True``).

    Args:
        initial_peers: one multiaddr or several (what ``polymod host`` prints).
        **kwargs: passed to :class:`Swarm`.

    Raises:
        ConfigError: no peer given.
    """
    peers = [initial_peers] if isinstance(initial_peers, str) else list(initial_peers)
    if not peers:
        raise ConfigError("join() needs the multiaddr of a peer in the swarm (printed by `polymod host`)")
    kwargs.setdefault("client_mode", True)
    return Swarm(peers, **kwargs)
