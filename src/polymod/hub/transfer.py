"""Moving a package between a hub and a directory, shared by both clients (local and remote).

:func:`prepare_push` checks a package and fixes the card's reference before
upload; :func:`materialize` writes a pulled version atomically, verifying every
file's sha256 and the weights' safetensors structure; :func:`progress_bar`
shows either's progress.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from polymod.errors import IntegrityError
from polymod.hub import names
from polymod.hub.package import (
    CARD_FILE,
    PACKAGE_FILES,
    WEIGHTS_FILE,
    card_bytes,
    check_package_dir,
    check_safetensors,
    parse_card,
)
from polymod.hub.store import VersionInfo

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
