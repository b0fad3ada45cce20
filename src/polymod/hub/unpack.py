"""Writing a pulled version to disk without ever touching what the user already has there.

A pull's destination is one of:

* a directory that does not exist yet (or is empty): the package is assembled in
  a temporary sibling and renamed into place only when every file checks out;
* a previous pull of the *same module* (any version): recognised by the record
  :data:`PULL_RECORD` that every pull leaves, which lists the files polymod wrote
  and their sha256. Only those files are replaced (each with an atomic
  ``os.replace``), and only while they are unchanged; anything else in the
  directory (``train.py``, ``data/``) stays as it is;
* anything else (a non-empty directory that is not such a pull, a directory whose
  pulled files were edited, a file) is refused with a
  :class:`~polymod.errors.DestinationError` before anything is downloaded or
  written; ``force=True`` (``--force``) writes the package files there anyway,
  still replacing only the package's own file names and deleting nothing.

Nothing here follows symbolic links: files are replaced, never written through.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from polymod.errors import DestinationError, IntegrityError
from polymod.hub import names
from polymod.hub.package import (
    CARD_FILE,
    PACKAGE_FILES,
    PULL_RECORD,
    WEIGHTS_FILE,
    check_safetensors,
    file_sha256,
    parse_card,
)
from polymod.hub.store import VersionInfo

Progress = Callable[[int], None]


def read_record(dest: Path) -> dict | None:
    """The pull record in ``dest`` (``{"module": "owner/name", "version", "files": {path: [sha256, ...]}}``), if any."""
    path = dest / PULL_RECORD
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode) or os.lstat(path).st_size > 1 << 16:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(data.get("module") if isinstance(data, dict) else None, str) or not isinstance(files, dict):
        return None
    if not all(p in PACKAGE_FILES and isinstance(h, list) for p, h in files.items()):
        return None
    return data


def check_destination(dest: Path, module: str, force: bool = False) -> dict | None:
    """Decide whether a pull of ``module`` (``owner/name``) may write to ``dest``; returns its pull record.

    Raises:
        DestinationError: ``dest`` is a file, a non-empty directory that is not a pull of ``module``,
            or a pull whose files were changed since (unless ``force``).
    """
    if (dest.is_symlink() and not dest.is_dir()) or (dest.exists() and not dest.is_dir()):
        raise DestinationError(f"pull destination {dest} exists and is not a directory; give a directory "
                               "(it is created when missing)")
    if not dest.exists():
        return None
    record = read_record(dest)
    entries = sorted(p.name for p in dest.iterdir())
    if not entries or force:
        return record
    how = "; pull into a new or empty directory, or pass --force (force=True) to write the package files there"
    if record is None:
        raise DestinationError(f"pull destination {dest} is not empty ({', '.join(entries[:5])}"
                               f"{', …' if len(entries) > 5 else ''}) and is not a previous pull: nothing was "
                               f"written{how} (only {', '.join(PACKAGE_FILES)} would be replaced, nothing deleted)")
    if record["module"] != module:
        raise DestinationError(f"pull destination {dest} holds a pull of {record['module']}, not {module}: "
                               f"nothing was written{how}")
    for path, hashes in record["files"].items():
        target = dest / path
        if not os.path.lexists(target):
            continue
        if not stat.S_ISREG(os.lstat(target).st_mode) or file_sha256(target) not in hashes:
            raise DestinationError(f"{target} was changed since it was pulled; nothing was written so your edit "
                                   f"is kept{how}")
    return record


def _write_record(dest: Path, module: str, version: str, files: dict[str, list[str]]) -> None:
    tmp = dest / f"{PULL_RECORD}.tmp"
    tmp.unlink(missing_ok=True)
    tmp.write_text(json.dumps({"module": module, "version": version, "files": files}, indent=2, sort_keys=True))
    os.replace(tmp, dest / PULL_RECORD)


def _download(info: VersionInfo, read: Callable[[str], Iterator[bytes]], tmp: Path, advance: Progress) -> None:
    for path, meta in info.files.items():
        h, size = hashlib.sha256(), 0
        with open(tmp / path, "xb") as f:
            for chunk in read(meta["sha256"]):
                size += len(chunk)
                if size > meta["size"]:  # a hostile hub streaming more than the manifest says is cut off here
                    raise IntegrityError(f"{info.ref}: {path} is longer than the {meta['size']:,} bytes the hub "
                                         "lists: corrupt or tampered; nothing was written")
                h.update(chunk)
                f.write(chunk)
                advance(len(chunk))
        if h.hexdigest() != meta["sha256"] or size != meta["size"]:
            raise IntegrityError(f"{info.ref}: {path} has sha256 {h.hexdigest()} ({size} bytes) but the hub "
                                 f"lists {meta['sha256']} ({meta['size']} bytes): corrupt or tampered; "
                                 "nothing was written")
    if (tmp / WEIGHTS_FILE).is_file():
        with open(tmp / WEIGHTS_FILE, "rb") as f:
            check_safetensors(f, (tmp / WEIGHTS_FILE).stat().st_size, f"{info.ref}: {WEIGHTS_FILE}")
    with open(tmp / CARD_FILE, "rb") as f:
        card = parse_card(f.read())
    if (card.owner, card.name, card.version) != (info.owner, info.name, info.version):
        raise IntegrityError(f"{info.ref}: its {CARD_FILE} names {card.owner}/{card.name}@{card.version}")


def materialize(info: VersionInfo, read: Callable[[str], Iterator[bytes]], dest: str | os.PathLike,
                progress: Callable[[int], object] | None = None, force: bool = False) -> Path:
    """Write a version's files to ``dest``, verifying each file's sha256 and the weights' structure first.

    Args:
        info: the version (its ``files`` give each path's sha256 and size).
        read: yields a blob's bytes by sha256.
        dest: the package directory: new, empty, or a previous pull of the same module (see the module doc).
        progress: called with the byte count of each chunk written.
        force: write into a non-empty directory that is not a previous pull (package file names only).

    Returns:
        The destination directory (absolute).

    Raises:
        IntegrityError: a file's bytes do not match its sha256, or the weights are not valid safetensors.
        DestinationError: ``dest`` may not be written (checked before anything is downloaded).
    """
    # What a (possibly hostile) hub says is checked before it names a path: no traversal through file names.
    names.check_owner(info.owner), names.check_name(info.name), names.check_version(info.version)
    if not set(info.files) <= set(PACKAGE_FILES) or CARD_FILE not in info.files:
        raise IntegrityError(f"{info.ref}: the hub lists files {sorted(info.files)[:5]!r:.200}; a package holds "
                             f"{CARD_FILE} and only {PACKAGE_FILES}")
    dest = Path(os.path.abspath(dest))
    module = f"{info.owner}/{info.name}"
    record = check_destination(dest, module, force)
    new = {p: [m["sha256"]] for p, m in info.files.items()}
    work = dest.parent if not dest.exists() else dest
    work.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".polymod-pull-", dir=work))
    try:
        _download(info, read, tmp, progress or (lambda n: None))
        if not dest.exists():
            _write_record(tmp, module, info.version, new)
            os.rename(tmp, dest)  # the whole package appears at once
            return dest
        # In place: the record first lists old and new hashes, so an interruption mid-way is still
        # recognised as polymod's own files by the next pull; then each file is replaced atomically.
        old = record["files"] if record and record["module"] == module else {}
        _write_record(dest, module, info.version,
                      {p: sorted(set(old.get(p, [])) | set(new.get(p, []))) for p in {*old, *new}})
        for path in info.files:
            os.replace(tmp / path, dest / path)
        for path in set(old) - set(new):  # files the previous pull wrote that this version lacks
            target = dest / path
            if os.path.lexists(target) and stat.S_ISREG(os.lstat(target).st_mode) and \
                    file_sha256(target) in old[path]:
                target.unlink()
        _write_record(dest, module, info.version, new)
        return dest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["check_destination", "materialize", "read_record"]
