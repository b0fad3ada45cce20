"""Writing blobs and locking a store: the pieces of :class:`~polymod.hub.store.Store` that touch the file system.

A blob is written to the store's ``tmp/``, hashed while written, fsynced, and renamed to its content address
(``blobs/sha256/ab/abcdef…``) only when complete and verified (:class:`BlobWriter`). :class:`ServerLock` keeps a
second hub server off a store whose uploads in progress it would otherwise sweep away.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from polymod.errors import HubError, IntegrityError, TooLargeError

if TYPE_CHECKING:
    from polymod.hub.store import Store


class BlobWriter:
    """Writes one blob: bytes go to ``tmp/``, are hashed as they come, and :meth:`commit` verifies the
    sha256, fsyncs and renames the file to its content address. Leaving the ``with`` block without a
    commit (an error, a dropped connection) deletes the partial file.
    """

    def __init__(self, store: Store, expected: str | None = None, max_bytes: int | None = None):
        if expected is not None:
            store.blob_path(expected)  # validates the hex digest before anything is written
        self.store, self.expected, self.max_bytes = store, expected, max_bytes
        self.hash, self.size = hashlib.sha256(), 0
        self.path = store.tmp / f"{uuid.uuid4().hex}.part"
        self.file = open(self.path, "wb")

    def __enter__(self) -> BlobWriter:
        return self

    def write(self, chunk: bytes) -> None:
        """Append a chunk.

        Raises:
            TooLargeError: the blob grows past ``max_bytes``.
        """
        self.size += len(chunk)
        if self.max_bytes is not None and self.size > self.max_bytes:
            raise TooLargeError(f"upload exceeds the size limit of {self.max_bytes:,} bytes")
        self.hash.update(chunk)
        self.file.write(chunk)

    def commit(self) -> tuple[str, int]:
        """Verify, fsync and move into place; returns (sha256, size).

        Raises:
            IntegrityError: the sha256 is not the expected one.
        """
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        sha = self.hash.hexdigest()
        if self.expected is not None and sha != self.expected:
            raise IntegrityError(f"content sha256 is {sha}, expected {self.expected}: corrupted in transit or tampered")
        target = self.store.blob_path(sha)
        target.parent.mkdir(exist_ok=True)
        os.replace(self.path, target)  # atomic; an identical blob already there is simply replaced
        return sha, self.size

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


class ServerLock:
    """An exclusive ``flock`` on ``<store>/server.lock``: one hub server per store.

    A second server would sweep the first one's uploads in progress as stale, so it is refused instead.
    The kernel drops the lock when the process dies (even by ``kill -9``), so no stale lock survives a crash.
    """

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise HubError(f"the store {path.parent} is already served by another hub server (pid {holder}); "
                           "stop it first, or serve another store directory") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, str(os.getpid()).encode(), 0)

    def release(self) -> None:
        """Release the lock (idempotent)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


SLOT_PREFIX = "server-"


def server_slot(store: Store) -> ServerLock:
    """An uploads folder of this server's own in a store that several servers share (PostgreSQL metadata).

    Creates and locks ``tmp/server-<id>.lock``, points ``store.tmp`` at ``tmp/server-<id>/``, and removes the
    folders of servers whose lock is free (they died, or stopped): their uploads can never be resumed.
    """
    base = store.root / "tmp"
    slot = f"{SLOT_PREFIX}{uuid.uuid4().hex[:12]}"
    lock = ServerLock(base / f"{slot}.lock")
    for other in base.glob(f"{SLOT_PREFIX}*.lock"):
        if other.name == f"{slot}.lock":
            continue
        try:
            stale = ServerLock(other)
        except (HubError, FileNotFoundError):
            continue  # a live server's folder (or one another server is removing)
        shutil.rmtree(other.with_suffix(""), ignore_errors=True)
        other.unlink(missing_ok=True)
        stale.release()
    store.tmp = base / slot
    store.tmp.mkdir(exist_ok=True)
    return lock
