"""The hub API: push, pull, search, show, lineage and yank, against a local store or a remote hub.

``connect(hub)`` returns a :class:`LocalHub` (a directory) or a
:class:`~polymod.hub.remote.RemoteHub` (an ``http(s)://`` URL); both have the
same methods, and the module-level functions (``pm.hub.push`` …) call them on
``connect(hub)``. Without ``hub`` the target is ``$POLYMOD_HUB``, else the
local store at ``$POLYMOD_HOME/hub``.

Pulling always verifies every file's sha256 and the weights' safetensors
structure before anything reaches the destination, and never deletes or
overwrites a user's files (see :mod:`polymod.hub.unpack`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from polymod.errors import HubError
from polymod.hub import names
from polymod.hub.ancestry import lineage
from polymod.hub.package import CARD_FILE, open_regular, package_files
from polymod.hub.query import search
from polymod.hub.remote import RemoteHub
from polymod.hub.store import CHUNK, Store, VersionInfo
from polymod.hub.transfer import materialize, package_dir, prepare_push, progress_bar


class LocalHub:
    """The hub API over a local :class:`Store` (no server, no authentication).

    Args:
        store: a store or its directory (default ``$POLYMOD_HOME/hub``).
    """

    def __init__(self, store: Store | str | os.PathLike | None = None):
        self.store = store if isinstance(store, Store) else Store(store)

    def __repr__(self) -> str:
        return f"LocalHub({str(self.store.root)!r})"

    def push(self, path: str | os.PathLike, ref: str, version: str | None = None,
             progress: bool = False) -> VersionInfo:
        """Publish the package at ``path`` as ``ref`` (``owner/name@version``); see :func:`push`."""
        target, card = prepare_push(path, ref, version)
        files = {CARD_FILE: self.store.write_blob([card])[0]}
        for name, extra in package_files(path).items():
            if name != CARD_FILE:
                with open_regular(extra) as f:
                    files[name] = self.store.write_blob(iter(lambda f=f: f.read(CHUNK), b""))[0]
        return self.store.publish(target.owner, target.name, target.version, files)

    def show(self, ref: str) -> VersionInfo:
        """The version ``ref`` points to (``latest`` when it has no version)."""
        r = names.Ref.parse(ref)
        return self.store.get(r.owner, r.name, r.version)

    def versions(self, ref: str) -> list[VersionInfo]:
        """Every version of the module ``owner/name``, newest first."""
        r = names.Ref.parse(ref)
        return self.store.versions(r.owner, r.name)

    def pull(self, ref: str, dest: str | os.PathLike | None = None, progress: bool = False,
             force: bool = False) -> Path:
        """Write the package ``ref`` to ``dest`` (default: the store's ``packages/owner/name/version``).

        ``dest`` must be new, empty or a previous pull of the same module unless ``force``; see :func:`pull`.
        """
        info = self.show(ref)
        if dest is None:
            dest, force = package_dir(self.store, info), True
        with progress_bar(progress, info.size, f"pull {info.ref}") as advance:
            return materialize(info, self.store.iter_blob, dest, advance, force)

    def search(self, query: str = "", limit: int = 20, offset: int = 0, owner: str | None = None,
               **facets: str | None):
        """Full-text search with facets; see :func:`polymod.hub.query.search`."""

        return search(self.store, query, limit=limit, offset=offset, owner=owner, **facets)

    def lineage(self, ref: str, depth: int = 8, offset: int = 0) -> dict[str, Any]:
        """The lineage graph (ancestors and a page of descendants from ``offset``) of ``ref``."""

        r = names.Ref.parse(ref)
        return lineage(self.store, r.owner, r.name, r.version, depth, offset)

    def yank(self, ref: str, reason: str = "", undo: bool = False) -> VersionInfo:
        """Yank ``ref`` (an exact version) or, with ``undo``, restore it."""
        r = names.Ref.parse(ref)
        return self.store.yank(r.owner, r.name, r.version, reason, yanked=not undo)


# What every ``hub=`` argument takes: a client, a store, its directory, a hub URL, or None for the default.
HubLike = LocalHub | RemoteHub | Store | str | os.PathLike | None


def connect(hub: HubLike = None, token: str | None = None) -> LocalHub | RemoteHub:
    """A hub client: ``LocalHub`` for a directory or ``Store``, ``RemoteHub`` for an ``http(s)://`` URL.

    Args:
        hub: a URL, a directory, a ``Store``, an existing client, or None for ``$POLYMOD_HUB``
            (else the local store at ``$POLYMOD_HOME/hub``).
        token: the token for a remote hub (default: ``$POLYMOD_TOKEN`` when ``$POLYMOD_HUB`` names that hub, else the
            one ``login`` saved for it).
    """

    if isinstance(hub, (LocalHub, RemoteHub)):
        return hub
    hub = hub if hub is not None else os.environ.get("POLYMOD_HUB") or None
    if isinstance(hub, str) and hub.startswith(("http://", "https://")):
        return RemoteHub(hub, token)
    if hub is not None and not isinstance(hub, (str, os.PathLike, Store)):
        raise HubError(f"hub must be a URL, a directory or a Store, got {type(hub).__name__}")
    return LocalHub(hub)
