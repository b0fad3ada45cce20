"""Moving a package between a hub and a directory, shared by both clients (local and remote).

:func:`prepare_push` checks a package and fixes the card's reference before
upload; :func:`~polymod.hub.unpack.materialize` (re-exported here) writes a pulled
version, verifying every file's sha256 and the weights' safetensors structure and
never touching the user's own files; :func:`progress_bar` shows either's progress.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from polymod.hub import names
from polymod.hub.package import card_bytes, check_package_dir
from polymod.hub.store import Store, VersionInfo
from polymod.hub.unpack import materialize

Advance = Callable[[int], None]


@contextmanager
def progress_bar(enabled: bool, total: int, label: str) -> Iterator[Advance]:
    """A rich progress bar (to stderr) advanced by the yielded callback; a no-op when disabled."""
    if not enabled:
        yield lambda n: None
        return

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


def package_dir(store: Store, info: VersionInfo) -> Path:
    """Where a pull without a destination writes: ``<store>/packages/owner/name/version`` (polymod's own)."""
    return store.root / "packages" / info.owner / info.name / info.version


__all__ = ["materialize", "package_dir", "prepare_push", "progress_bar"]
