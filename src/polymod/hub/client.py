"""The hub API: push, pull, search, show, lineage and yank, against a local store or a remote hub.

``connect(hub)`` returns a :class:`LocalHub` (a directory) or a
:class:`~polymod.hub.remote.RemoteHub` (an ``http(s)://`` URL); both have the
same methods, and the module-level functions (``pm.hub.push`` …) call them on
``connect(hub)``. Without ``hub`` the target is ``$POLYMOD_HUB``, else the
local store at ``$POLYMOD_HOME/hub``.

Pulling always verifies every file's sha256 and the weights' safetensors
structure, and writes the package to a temporary sibling directory renamed
into place only when complete: an interrupted pull leaves nothing visible.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from polymod.hub import names
from polymod.hub.errors import HubError, IntegrityError
from polymod.hub.package import CARD_FILE, WEIGHTS_FILE, card_bytes, check_package_dir, check_safetensors
from polymod.hub.store import Store, VersionInfo

Progress = Callable[[int], None]


@contextmanager
def progress_bar(enabled: bool, total: int, label: str) -> Iterator[Progress]:
    """A rich progress bar (to stderr) advanced by the yielded callback; a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def prepare_push(path: str | os.PathLike, ref: str, version: str | None = None) -> tuple[names.Ref, bytes]:
    """Check a package directory and return its target reference and the card bytes to publish.

    The card's owner, name and version are set from ``ref`` (or ``version``, or the card's own version).

    Raises:
        FormatError / IntegrityError: the directory is not a valid package.
        InvalidNameError: a bad reference, or no version anywhere.
    """
    card = check_package_dir(path)
    target = names.Ref.parse(ref)
    chosen = version or (target.version if target.version != names.LATEST else None) or card.version
    if chosen is None:
        raise names.InvalidNameError(f"no version to publish {ref} as: give 'owner/name@1.0.0' or version=")
    target = replace(target, version=names.check_version(chosen))
    card.owner, card.name, card.version = target.owner, target.name, target.version
    return target, card_bytes(card)


def materialize(info: VersionInfo, read: Callable[[str], Iterator[bytes]], dest: Path,
                progress: bool = False) -> Path:
    """Write a version's files to ``dest`` atomically, verifying each file's sha256 and the weights' structure.

    Args:
        info: the version (its ``files`` give each path's sha256 and size).
        read: yields a blob's bytes by sha256.
        dest: the package directory to create (replaced if it exists).
        progress: show a progress bar.

    Raises:
        IntegrityError: a file's bytes do not match its sha256, or the weights are not valid safetensors.
    """
    import hashlib

    from polymod.hub.package import PACKAGE_FILES

    # What a (possibly hostile) hub says is checked before it names a path: no traversal through file names.
    names.check_owner(info.owner), names.check_name(info.name), names.check_version(info.version)
    if not set(info.files) <= set(PACKAGE_FILES) or CARD_FILE not in info.files:
        raise IntegrityError(f"{info.ref}: the hub lists files {sorted(info.files)[:5]!r:.200}; a package holds "
                             f"{CARD_FILE} and only {PACKAGE_FILES}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with progress_bar(progress, info.size, f"pull {info.ref}") as advance:
            for path, meta in info.files.items():
                h, size = hashlib.sha256(), 0
                with open(tmp / path, "wb") as f:
                    for chunk in read(meta["sha256"]):
                        h.update(chunk)
                        size += len(chunk)
                        f.write(chunk)
                        advance(len(chunk))
                if h.hexdigest() != meta["sha256"] or size != meta["size"]:
                    raise IntegrityError(f"{info.ref}: {path} has sha256 {h.hexdigest()} ({size} bytes) but the hub "
                                         f"lists {meta['sha256']} ({meta['size']} bytes): corrupt or tampered; "
                                         "nothing was written")
        if (tmp / WEIGHTS_FILE).is_file():
            with open(tmp / WEIGHTS_FILE, "rb") as f:
                check_safetensors(f, (tmp / WEIGHTS_FILE).stat().st_size, f"{info.ref}: {WEIGHTS_FILE}")
        from polymod.hub.package import parse_card

        card = parse_card((tmp / CARD_FILE).read_bytes())
        if (card.owner, card.name, card.version) != (info.owner, info.name, info.version):
            raise IntegrityError(f"{info.ref}: its {CARD_FILE} names {card.owner}/{card.name}@{card.version}")
        old = dest.with_name(f".{dest.name}.old")
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
        for extra in sorted(Path(path).iterdir()):
            if extra.name != CARD_FILE:
                files[extra.name] = self.store.add_file(extra)[0]
        return self.store.publish(target.owner, target.name, target.version, files)

    def show(self, ref: str) -> VersionInfo:
        """The version ``ref`` points to (``latest`` when it has no version)."""
        r = names.Ref.parse(ref)
        return self.store.get(r.owner, r.name, r.version)

    def versions(self, ref: str) -> list[VersionInfo]:
        """Every version of the module ``owner/name``, newest first."""
        r = names.Ref.parse(ref)
        return self.store.versions(r.owner, r.name)

    def pull(self, ref: str, dest: str | os.PathLike | None = None, progress: bool = False) -> Path:
        """Write the package ``ref`` to ``dest`` (default: the store's ``packages/owner/name/version``)."""
        info = self.show(ref)
        dest = Path(dest) if dest is not None else self.store.root / "packages" / info.owner / info.name / info.version
        return materialize(info, self.store.iter_blob, dest, progress)

    def search(self, query: str = "", limit: int = 20, offset: int = 0, owner: str | None = None,
               **facets: str | None):
        """Full-text search with facets; see :func:`polymod.hub.query.search`."""
        from polymod.hub.query import search

        return search(self.store, query, limit=limit, offset=offset, owner=owner, **facets)

    def lineage(self, ref: str, depth: int = 8) -> dict[str, Any]:
        """The lineage graph (ancestors and descendants) of ``ref``."""
        from polymod.hub.ancestry import lineage

        r = names.Ref.parse(ref)
        return lineage(self.store, r.owner, r.name, r.version, depth)

    def yank(self, ref: str, reason: str = "", undo: bool = False) -> VersionInfo:
        """Yank ``ref`` (an exact version) or, with ``undo``, restore it."""
        r = names.Ref.parse(ref)
        return self.store.yank(r.owner, r.name, r.version, reason, yanked=not undo)


def connect(hub: Any = None, token: str | None = None):
    """A hub client: ``LocalHub`` for a directory or ``Store``, ``RemoteHub`` for an ``http(s)://`` URL.

    Args:
        hub: a URL, a directory, a ``Store``, an existing client, or None for ``$POLYMOD_HUB``
            (else the local store at ``$POLYMOD_HOME/hub``).
        token: the token for a remote hub (default ``$POLYMOD_TOKEN``, else the one saved by ``login``).
    """
    from polymod.hub.remote import RemoteHub

    if isinstance(hub, (LocalHub, RemoteHub)):
        return hub
    hub = hub if hub is not None else os.environ.get("POLYMOD_HUB") or None
    if isinstance(hub, str) and hub.startswith(("http://", "https://")):
        return RemoteHub(hub, token)
    if hub is not None and not isinstance(hub, (str, os.PathLike, Store)):
        raise HubError(f"hub must be a URL, a directory or a Store, got {type(hub).__name__}")
    return LocalHub(hub)
