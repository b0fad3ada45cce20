"""A host in its own supervised process tree: ``polymod host`` and the tests start hosts this way.

hivemind serves from about ten forked processes per server (DHT, connection handlers,
task pools) and the libp2p daemon. If only the server's main process dies, the forked
children keep accepting requests that are never answered, and nothing kills them. So:

* :class:`HostProcess` (the supervisor) starts ``python -m polymod.swarm.process`` in a
  **new session**: the host and everything it forks share one process group, which
  :meth:`HostProcess.kill` ends with one ``killpg`` (by the group's id, never by name);
* the host writes one JSON line when it serves (peer id, addresses, owner, expert ids)
  and the supervisor waits for it with a **timeout** — a start hung on a lock inherited
  through ``fork`` (seen once in 38 starts) is killed and retried once;
* the host watches its parent: when the supervisor is gone it stops serving, and on
  ``SIGTERM`` it shuts the server down and signals its whole group before exiting.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from polymod.errors import ConfigError, StateError
from polymod.format import load, read_card
from polymod.hub import api as hub_api
from polymod.hub.remote import RemoteHub
from polymod.swarm.host import Host
from polymod.swarm.peer import Swarm, load_owner_key
from polymod.swarm.records import base_ref


@dataclass
class HostConfig:
    """What a host process serves and how it joins (also the JSON its command line carries).

    Attributes:
        source: a module package directory, or a hub reference ``owner/name[@version]``.
        name: ``owner/name`` to announce a directory under (default: its card's owner/name).
        hub: the hub to pull ``source`` from (URL or store directory; None: the default hub).
        public: announce the weights as pullable from ``hub`` (hub sources only).
        dht: multiaddrs of peers to join (none: start a new swarm).
        listen: multiaddrs to listen on (default loopback, a free port).
        announce: multiaddrs other peers should dial (behind NAT).
        key: file of the owner key (created on first use); None: a fresh key per start.
        ttl: seconds an announcement lives; refreshed every ttl/3.
        start_timeout: seconds the server may take to become ready.
    """

    source: str
    name: str | None = None
    hub: str | None = None
    public: bool = True
    dht: list[str] = field(default_factory=list)
    listen: list[str] = field(default_factory=list)
    announce: list[str] = field(default_factory=list)
    key: str | None = None
    ttl: float = 30.0
    start_timeout: float = 60.0


def open_module(config: HostConfig) -> tuple[Any, str, str | None, bool, str | None]:
    """Load the module to serve: (module, ref, version, public, hub).

    Raises:
        ConfigError: a directory without a name to announce it under.
    """
    path = Path(config.source)
    if path.is_dir():
        module = load(path)
        card = module.card
        name = config.name or (f"{card.owner}/{card.name}" if card.owner and card.name else None)
        if name is None:
            raise ConfigError(f"{path} has no owner/name in its card; give one with --name owner/name")
        return module, base_ref(name), card.version, False, None
    client = hub_api.connect(config.hub)
    module = load(client.pull(config.source))
    where = client.url if isinstance(client, RemoteHub) else str(client.store.root)  # what clients pull from
    return module, base_ref(config.name or config.source), module.card.version, config.public, where


def check_config(config: HostConfig) -> None:
    """Refuse, before any process starts, what the host would refuse: a directory without a name to announce.

    Raises:
        ConfigError: a bad name or a directory whose card has no owner/name (and no ``name`` given).
    """
    if config.name is not None:
        base_ref(config.name)
    path = Path(config.source)
    if path.is_dir() and config.name is None:
        card = read_card(path)
        if not (card.owner and card.name):
            raise ConfigError(f"{path} has no owner/name in its card; give one with --name owner/name")
    elif not path.is_dir():
        base_ref(config.source)


def serve(config: HostConfig, out: IO[str] = sys.stdout,
          wrap: Callable[[Any], Any] | None = None) -> None:
    """Run a host in this process until SIGTERM or the parent's death (the child side of :class:`HostProcess`).

    Args:
        config: what to serve.
        out: where the one JSON ready line goes.
        wrap: applied to the :class:`~polymod.swarm.host.Host` before it starts (tests make hosts slow or wrong).
    """
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    module, ref, version, public, hub = open_module(config)
    swarm = Swarm(config.dht, host_maddrs=config.listen or None, announce_maddrs=config.announce or None,
                  owner_key=load_owner_key(config.key))
    host = Host(module, ref, swarm, version=version, public=public, hub=hub, ttl=config.ttl)
    if wrap is not None:
        wrap(host)
    try:
        host.start(config.start_timeout)
        out.write(json.dumps({"ready": True, "peer_id": swarm.peer_id, "addresses": swarm.addresses,
                              "owner": swarm.owner, "ref": ref, "content_hash": host.record.content_hash,
                              "uids": [s.uid for s in host.sites], "pid": os.getpid()}) + "\n")
        out.flush()
        host.serve_forever(stop, parent_pid=parent)
    finally:
        host.shutdown()
        if os.getpgid(0) == os.getpid():  # our own group (HostProcess starts a new session), never a caller's
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.killpg(os.getpgid(0), signal.SIGTERM)  # forked children left behind by a failed shutdown


class HostProcess:
    """Start, watch and stop one host process tree (see the module docstring).

    Args:
        config: what the host serves.
        log: file for the host's log (stderr); None inherits this process's stderr.
        entry: the command that runs the host (default ``python -m polymod.swarm.process``); tests
            pass their own entry to start hosts that misbehave.
    """

    def __init__(self, config: HostConfig, log: str | os.PathLike | None = None,
                 entry: Sequence[str] | None = None):
        self.config, self.log = config, log
        self.entry = list(entry or [sys.executable, "-m", "polymod.swarm.process"])
        self.proc: subprocess.Popen | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout: float = 90.0, attempts: int = 2) -> dict[str, Any]:
        """Start the host and wait for its ready line (killing and retrying a hung start).

        Returns:
            The ready line: ``peer_id``, ``addresses``, ``owner``, ``ref``, ``content_hash``, ``uids``, ``pid``.

        Raises:
            StateError: the host exited or did not become ready in time, ``attempts`` times.
        """
        check_config(self.config)
        why = ""
        for _ in range(attempts):
            stderr = open(self.log, "ab") if self.log is not None else None  # noqa: SIM115 (owned by the child)
            self.proc = subprocess.Popen([*self.entry, json.dumps(asdict(self.config))], stdout=subprocess.PIPE,
                                         stderr=stderr, text=True, start_new_session=True)
            if stderr is not None:
                stderr.close()
            line = _read_line(self.proc, timeout)
            if line is not None:
                try:
                    info = json.loads(line)
                except ValueError:
                    info = {}
                if info.get("ready"):
                    self.info = info
                    return info
                self.kill()  # the host said why it cannot serve: starting it again would say the same
                raise StateError(f"the host of {self.config.source!r} did not start: "
                                 f"{info.get('error', line.strip()[:200])}")
            else:
                why = (f"exited with code {self.proc.returncode}" if self.proc.poll() is not None
                       else f"not ready in {timeout:g} s")
            self.kill()
        raise StateError(f"the host of {self.config.source!r} did not start ({why}); see "
                         f"{self.log or 'its stderr'} for the host's log")

    @property
    def pid(self) -> int | None:
        """The host's process id (also its process group id)."""
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        """Whether the host's main process runs."""
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """Ask the host to stop (SIGTERM), then kill its process group after ``grace`` seconds."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self.kill()

    def kill(self) -> None:
        """SIGKILL the host's whole process group (its forked children and the libp2p daemon too)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> HostProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """The first line of ``proc``'s stdout, or None when it exits or ``timeout`` passes first."""
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(proc.stdout.readline()), daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    while reader.is_alive() and time.monotonic() < deadline:
        reader.join(0.1)
    return found[0] if found and found[0] else None


def main(argv: Sequence[str] | None = None, wrap: Callable[[Any], Any] | None = None) -> None:
    """The host process: ``python -m polymod.swarm.process '<HostConfig JSON>'``."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = HostConfig(**json.loads(args[0]))
        serve(config, wrap=wrap)
    except Exception as exc:  # the supervisor reads the reason from the ready line
        sys.stdout.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        sys.stdout.flush()
        raise


if __name__ == "__main__":
    main()
