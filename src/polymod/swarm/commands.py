"""``polymod host`` and ``polymod swarm ls``: the command-line side of the swarm (thin, over the library)."""

from __future__ import annotations

import json
import signal
import time
from typing import Annotated, Any

import typer

from polymod.errors import StateError
from polymod.swarm.peer import join
from polymod.swarm.process import HostConfig, HostProcess

app = typer.Typer(help="The swarm: peers hosting modules live (hivemind).", no_args_is_help=True)

def host(
    ref: str = typer.Argument(..., help="A hub reference owner/name[@version], or a module package directory."),
    dht: Annotated[list[str] | None, typer.Option("--dht", help="Multiaddr of a peer to join (repeatable); "
                                                  "none starts a new swarm.")] = None,
    listen: Annotated[list[str] | None, typer.Option("--listen", help="Multiaddr to listen on (repeatable; "
                                                     "default /ip4/127.0.0.1/tcp/0, loopback only).")] = None,
    announce: Annotated[list[str] | None, typer.Option("--announce", help="Multiaddr other peers should dial "
                                                       "(repeatable; behind NAT: your public address).")] = None,
    name: str = typer.Option(None, "--name", help="owner/name to announce a directory under (default: its card)."),
    hub: str = typer.Option(None, "--hub", help="Hub URL or store directory to pull REF from."),
    private: bool = typer.Option(False, "--private", help="Do not announce the weights as pullable from the hub."),
    key: str = typer.Option(None, "--key", help="Owner key file (created if missing): keeps the owner "
                            "fingerprint clients pin across restarts. Default: a new key each start."),
    ttl: float = typer.Option(30.0, help="Seconds an announcement lives (refreshed every ttl/3)."),
    start_timeout: float = typer.Option(90.0, help="Seconds the host may take to start (one retry)."),
    once: bool = typer.Option(False, "--once", help="Start, print the ready line, stop (a check)."),
) -> None:
    """Host a module: serve its site functions to the swarm until interrupted (Ctrl-C)."""
    config = HostConfig(source=ref, name=name, hub=hub, public=not private, dht=list(dht or []),
                        listen=list(listen or []), announce=list(announce or []), key=key, ttl=ttl,
                        start_timeout=start_timeout)
    proc = HostProcess(config)
    info = proc.start(timeout=start_timeout + 30)
    print(json.dumps(info), flush=True)
    typer.echo(f"hosting {info['ref']} ({len(info['uids'])} sites) as owner {info['owner']}; join with "
               f"--dht {info['addresses'][0]}", err=True)
    if once:
        proc.stop()
        return
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _: stopping.append(signum))
    try:
        while not stopping and proc.alive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        died = not proc.alive()
        proc.stop()
    if died and not stopping:
        raise StateError(f"the host process exited unexpectedly (code {proc.proc.returncode}); its process "
                         "group was killed")


@app.command("ls")
def ls(
    dht: Annotated[list[str], typer.Option("--dht", help="Multiaddr of a peer in the swarm (repeatable).")],
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    timeout: float = typer.Option(2.0, help="Deadline of each latency probe, in seconds."),
) -> None:
    """List the swarm's peers: owner, peer id, hosted modules, load (rows/s) and latency."""
    swarm = join(dht)
    try:
        rows = listing(swarm, timeout)
    finally:
        swarm.shutdown()
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'owner':16}  {'peer':12}  {'rows/s':>7}  {'ms':>7}  modules")
    for row in rows:
        ms = f"{row['latency_ms']:.1f}" if row["latency_ms"] is not None else "-"
        print(f"{row['owner']:16}  {row['peer_id'][-12:]:12}  {row['load']:7.1f}  {ms:>7}  "
              f"{', '.join(row['modules'])}")


def listing(swarm: Any, timeout: float = 2.0) -> list[dict[str, Any]]:
    """One row per peer listed in the swarm, with the round trip of a probe to one of its experts."""
    rows = []
    for owner, entry in sorted(swarm.peers().items()):
        latency = None
        for module in entry.modules:
            found, _ = swarm.lookup(module.split("@", 1)[0])
            record = found.get(owner)
            if record is None:
                continue
            try:
                latency = 1e3 * swarm.ping(record.peer_id, record.sites[0].uid, timeout)
            except Exception:  # unreachable peers are listed with no latency
                latency = None
            break
        rows.append({"owner": owner, "peer_id": entry.peer_id, "modules": entry.modules, "load": entry.load,
                     "age_s": round(time.time() - entry.time, 1), "latency_ms": latency})
    return rows
