"""``pm.hub.push/pull/search/show/lineage/…``: the hub API as functions.

Each takes ``hub=`` — a URL, a store directory, or None for ``$POLYMOD_HUB``
(else the local store at ``$POLYMOD_HOME/hub``) — and calls the same method
on :func:`~polymod.hub.client.connect`\\ ``(hub)``, so code written against a
local store works unchanged against a server.

Example:
    >>> pm.save(model["ab"], "out/ab")
    >>> pm.hub.push("out/ab", "me/ab@1.0.0", hub="http://127.0.0.1:8000")
    >>> module = pm.hub.get("me/ab@1.0.0", host=host, hub="http://127.0.0.1:8000")
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from polymod import format
from polymod.hub.client import HubLike, connect
from polymod.hub.query import SearchResult
from polymod.hub.remote import RemoteHub, save_token
from polymod.hub.store import VersionInfo


def push(path: str | os.PathLike, ref: str, version: str | None = None, *, hub: HubLike = None,
         token: str | None = None, progress: bool = False) -> VersionInfo:
    """Publish the package at ``path`` (written by ``pm.save``) as ``owner/name@version``.

    Args:
        path: the package directory.
        ref: ``owner/name`` or ``owner/name@version``.
        version: the version, when ``ref`` has none (else the card's own ``version``).
        hub: where to publish (URL, directory, or None for the default).
        token: the owner's token, for a remote hub.
        progress: show a progress bar.

    Returns:
        The published version. Publishing identical content again returns it unchanged.

    Raises:
        FormatError / IntegrityError: not a valid package (unknown files, a bad card, weights that are
            not safetensors).
        InvalidNameError: a malformed reference or version.
        ConflictError: the version exists with different content.
        AuthError / ForbiddenError: a remote hub refused the token or the namespace.
    """
    return connect(hub, token).push(path, ref, version, progress=progress)


def pull(ref: str, dest: str | os.PathLike | None = None, *, hub: HubLike = None, token: str | None = None,
         progress: bool = False, force: bool = False) -> Path:
    """Fetch ``owner/name[@version]`` (default ``latest``) and write its package to ``dest``.

    Every file's sha256 and the weights' safetensors structure are verified before
    anything reaches ``dest`` (default: under the local store). A pull never deletes
    or overwrites a user's files: ``dest`` must be missing, empty, or a previous pull
    of the same module whose files are unchanged (then only those files are replaced,
    each atomically; anything else there is left alone).

    Args:
        ref: ``owner/name[@version]``.
        dest: the package directory.
        hub: where to pull from (URL, directory, or None for the default).
        token: a token, for a remote hub that needs one.
        progress: show a progress bar.
        force: write into a non-empty ``dest`` that is not a previous pull; only the package's
            own file names (``module.json``, ``weights.safetensors``, ``README.md``) are replaced.

    Returns:
        The package directory (absolute), ready for ``pm.load``.

    Raises:
        NotFoundError: no such module or version.
        IntegrityError: a file does not match its sha256, is truncated, or is not safetensors.
        DestinationError: ``dest`` holds other files or edited pulled files (nothing is written).
    """
    return connect(hub, token).pull(ref, dest, progress=progress, force=force)


def get(ref: str, host: nn.Module | None = None, *, hub: HubLike = None, token: str | None = None) -> Any:
    """Pull ``ref`` and load it; with ``host``, check that the module fits it first.

    Returns:
        A :class:`~polymod.modules.contract.Module` (or a composition package).

    Raises:
        IncompatibleHostError: ``host`` lacks the module's sites or their shapes differ (the
            message names every difference). A compatible host that differs (another
            architecture name, other weights) gives a ``HostMismatchWarning``.
    """
    path = pull(ref, hub=hub, token=token)
    if host is not None:
        format.require_fit(format.read_card(path), host, ref)
    return format.load(path)


def show(ref: str, *, hub: HubLike = None) -> VersionInfo:
    """The card, files and state of ``owner/name[@version]``."""
    return connect(hub).show(ref)


def versions(ref: str, *, hub: HubLike = None) -> list[VersionInfo]:
    """Every version of ``owner/name``, newest first, yanked ones marked."""
    return connect(hub).versions(ref)


def search(query: str = "", *, hub: HubLike = None, limit: int = 20, offset: int = 0, owner: str | None = None,
           kind: str | None = None, architecture: str | None = None, task: str | None = None,
           language: str | None = None, tag: str | None = None) -> SearchResult:
    """Full-text search over the latest version of every module, with exact facet filters and counts."""
    return connect(hub).search(query, limit=limit, offset=offset, owner=owner, kind=kind,
                               architecture=architecture, task=task, language=language, tag=tag)


def lineage(ref: str, *, hub: HubLike = None, depth: int = 8, offset: int = 0) -> dict[str, Any]:
    """The lineage graph of ``ref``: ancestors and descendants up to ``depth`` generations.

    Parents are the ones each card declares, verified by the hub; descendants come in pages of
    ``polymod.hub.ancestry.MAX_CHILDREN`` per version (``offset`` pages through ``ref``'s own), and
    ``graph["children"]`` gives their total.
    """
    return connect(hub).lineage(ref, depth, offset)


def yank(ref: str, reason: str = "", *, hub: HubLike = None, token: str | None = None,
         undo: bool = False) -> VersionInfo:
    """Yank an exact version (hidden from ``latest`` and search; still pullable by exact version)."""
    return connect(hub, token).yank(ref, reason, undo=undo)


def login(url: str, token: str) -> str:
    """Check ``token`` against the hub at ``url`` and save it for later calls; returns the user name.

    Raises:
        AuthError: the hub rejects the token.
    """

    user = RemoteHub(url, token).whoami()
    save_token(url, token)
    return user
