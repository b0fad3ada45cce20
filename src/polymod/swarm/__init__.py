"""Remote modules and experts over hivemind: host a module's site functions, use them from other peers.

* :class:`~polymod.swarm.peer.Swarm` / :func:`~polymod.swarm.peer.join` — a node of the swarm (a hivemind
  DHT whose records are signed by the node's owner key);
* :class:`~polymod.swarm.host.Host` and :class:`~polymod.swarm.process.HostProcess` — serve a module's
  site functions as experts (``polymod host``), in a supervised process tree;
* :class:`~polymod.swarm.remote.Remote` (``pm.Remote``) — a module kind whose parts call those experts,
  usable in every composition; :func:`~polymod.swarm.remote.report` says who answered;
* :mod:`~polymod.swarm.trust` — owner pinning, verification sampling and quarantine.

Nothing here imports hivemind at import time: ``import polymod`` works without the ``swarm`` extra.
"""

from polymod.swarm.mixer import remote_mixer
from polymod.swarm.peer import Swarm, SwarmUnavailableError, join
from polymod.swarm.remote import Remote, RemotePart, report

__all__ = ["Remote", "RemotePart", "Swarm", "SwarmUnavailableError", "join", "remote_mixer", "report"]
