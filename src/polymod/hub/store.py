"""The local store: a metadata database plus a content-addressed blob directory.

Layout under the store's root (default ``$POLYMOD_HOME/hub``, ``POLYMOD_HOME``
defaulting to ``~/.cache/polymod``)::

    index.sqlite                  versions, files, tags, lineage, users, tokens, FTS5 search (the default)
    database.json                 instead, the PostgreSQL database holding them (:mod:`polymod.hub.binding`)
    blobs/sha256/ab/abcdef…       every file once, named by the sha256 of its bytes
    tmp/                          uploads in progress (never read; swept on open)

Atomicity: a blob is written to ``tmp/``, hashed while written, fsynced, and
renamed to its content address only when complete and verified; a version is
one database transaction that refers to blobs already in place. An interrupted
push therefore leaves at most an unreferenced blob (removed by :meth:`Store.gc`),
never a partial version. Identical files are stored once (deduplication).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from polymod.errors import ConflictError, FormatError, IntegrityError, NotFoundError, TooLargeError
from polymod.hub import binding, latest, names
from polymod.hub import db as database
from polymod.hub.blobs import SLOT_PREFIX, BlobWriter, ServerLock, server_slot
from polymod.hub.package import (
    CARD_FILE,
    MAX_CARD_BYTES,
    MAX_HEADER_BYTES,
    MAX_README_BYTES,
    MAX_TENSORS,
    PACKAGE_FILES,
    README_FILE,
    WEIGHTS_FILE,
    check_readme,
    check_safetensors,
    file_sha256,
    parse_card,
)

CHUNK = 1 << 20
STALE_TMP_SECONDS = 3600.0
# The weights check's verdict on a blob is kept under this key: content is immutable, so a hash checked once
# (valid or not) is never parsed again; a change of the checker or its limits changes the key.
CHECKER = f"safetensors-v2-{MAX_HEADER_BYTES}-{MAX_TENSORS}"


def home() -> Path:
    """polymod's home directory: ``$POLYMOD_HOME`` or ``~/.cache/polymod``."""
    return Path(os.environ.get("POLYMOD_HOME") or Path.home() / ".cache" / "polymod")


def declared_parent(conn, child_owner: str, name: str, version: str | None) -> Any:
    """The version of this hub a lineage parent declares (``owner/name`` or a bare name in the child's namespace)."""
    owner, _, bare = name.rpartition("/")
    if not version:
        return None
    return conn.execute("SELECT * FROM versions WHERE owner=? AND name=? AND version=?",
                        (owner or child_owner, bare, version)).fetchone()


def check_parents(conn, owner: str, parents: list) -> None:
    """Verify a card's declared parents on publish: a declared ``name@version`` here must have the declared hash.

    Raises:
        FormatError: a parent names a version of this hub whose content hash differs from the declared one.
    """
    for p in parents:
        row = declared_parent(conn, owner, p.name, p.version)
        if row is not None and p.sha256 and row["sha256"] != p.sha256:
            raise FormatError(f"lineage parent {p.name}@{p.version} has content hash {row['sha256']} in this hub, "
                              f"but the card declares {p.sha256}: fix the parent's name, version or sha256")


@dataclass
class VersionInfo:
    """One published version: its card, files and state."""

    owner: str
    name: str
    version: str
    sha256: str
    kind: str
    card: dict[str, Any]
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # path -> {"sha256", "size"}
    size: int = 0
    created: float = 0.0
    uploader: str | None = None
    yanked: bool = False
    yank_reason: str | None = None
    downloads: int = 0  # pulls served by a hub server (its module.json fetched), filled in by the server

    @property
    def ref(self) -> str:
        """``owner/name@version``."""
        return f"{self.owner}/{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the server's response body)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VersionInfo:
        """Inverse of :meth:`to_dict`."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


class Store:
    """A hub store on the local file system.

    Args:
        root: the directory (created if missing); default ``$POLYMOD_HOME/hub``.
        busy_timeout: seconds a write waits for the index's lock before ``BusyError``.
        db: where the metadata lives: ``None`` (``$POLYMOD_HUB_DB``, else what the store was created with,
            else ``index.sqlite`` in ``root``), ``"sqlite"`` or a ``postgresql://`` URL (:mod:`polymod.hub.db`).
    """

    def __init__(self, root: str | os.PathLike | None = None, busy_timeout: float = 60.0, db: str | None = None):
        self.root = Path(root) if root is not None else home() / "hub"
        self.busy_timeout = busy_timeout
        self.blobs = self.root / "blobs" / "sha256"
        self.tmp = self.root / "tmp"
        self.blobs.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.db = binding.open_database(self.root, db)
        self.sweep_tmp(STALE_TMP_SECONDS)

    def __repr__(self) -> str:
        return f"Store({str(self.root)!r})"

    def connect(self):
        """A new connection to the metadata database (one per thread or operation); writes wait ``busy_timeout`` s."""
        return self.db.connect(self.busy_timeout)

    def lock_for_server(self) -> ServerLock:
        """Take the store's server lock (released by :meth:`ServerLock.release` or when the process ends).

        On SQLite one server serves a store. On PostgreSQL several may share it (on one machine or, over a shared
        file system, several): each gets its own uploads folder ``tmp/server-<id>/`` (this store's :attr:`tmp`
        from now on), locked while it runs, and the folders of servers that died are removed.

        Raises:
            HubError: on SQLite, another hub server (another process, or another app in this one) serves this store.
        """
        if self.db.backend == "sqlite":
            return ServerLock(self.root / "server.lock")
        return server_slot(self)

    # -- blobs -------------------------------------------------------------------------------

    def blob_path(self, sha256: str) -> Path:
        """Where the blob with this sha256 lives (whether or not it exists)."""
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise IntegrityError(f"{sha256!r:.80} is not a sha256 (64 lowercase hex digits)")
        return self.blobs / sha256[:2] / sha256

    def has_blob(self, sha256: str) -> bool:
        """Whether the blob is stored."""
        return self.blob_path(sha256).is_file()

    def write_blob(self, chunks: Iterable[bytes], expected: str | None = None, max_bytes: int | None = None,
                   on_chunk: Callable[[int], None] | None = None) -> tuple[str, int]:
        """Store a stream of bytes under its sha256, atomically (see :class:`BlobWriter`).

        Args:
            chunks: the content.
            expected: the sha256 the content must have (verified before it becomes visible).
            max_bytes: refuse content longer than this.
            on_chunk: called with each chunk's length (progress bars).

        Returns:
            (sha256, size).

        Raises:
            IntegrityError: the content's sha256 is not ``expected``.
            TooLargeError: more than ``max_bytes``.
        """
        with BlobWriter(self, expected, max_bytes) as writer:
            for chunk in chunks:
                writer.write(chunk)
                if on_chunk:
                    on_chunk(len(chunk))
            return writer.commit()

    def add_file(self, path: str | os.PathLike) -> tuple[str, int]:
        """Store a file's bytes as a blob; returns (sha256, size)."""
        with open(path, "rb") as f:
            return self.write_blob(iter(lambda: f.read(CHUNK), b""))

    def verify_blob(self, sha256: str, size: int | None = None) -> bool:
        """Whether the stored blob still has its sha256 (and ``size``): re-hashes the file."""
        path = self.blob_path(sha256)
        try:
            return (size is None or path.stat().st_size == size) and file_sha256(path) == sha256
        except (OSError, FormatError):
            return False

    def open_blob(self, sha256: str) -> BinaryIO:
        """Open a stored blob for reading.

        Raises:
            NotFoundError: no such blob.
        """
        try:
            return open(self.blob_path(sha256), "rb")
        except FileNotFoundError:
            raise NotFoundError(f"blob {sha256} is not in the store {self.root}") from None

    def iter_blob(self, sha256: str) -> Iterator[bytes]:
        """The blob's bytes in chunks."""
        with self.open_blob(sha256) as f:
            while chunk := f.read(CHUNK):
                yield chunk

    def sweep_tmp(self, older_than: float = 0.0) -> int:
        """Delete unfinished uploads older than ``older_than`` seconds; returns how many."""
        now, removed = time.time(), 0
        for p in self.tmp.iterdir():
            if p.name.startswith(SLOT_PREFIX):
                continue  # a hub server's own uploads folder (see lock_for_server)
            try:
                if now - p.stat().st_mtime >= older_than:
                    p.unlink()
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    # -- versions ----------------------------------------------------------------------------

    def publish(self, owner: str, name: str, version: str, files: dict[str, str],
                uploader: str | None = None) -> VersionInfo:
        """Publish a version whose files (path → sha256) are already stored as blobs.

        ``module.json`` must name the same owner, name and version. Publishing the
        identical content again returns the existing version (safe retries);
        different content under an existing version is refused.

        Raises:
            InvalidNameError: a bad owner, name or version.
            FormatError / IntegrityError: unknown files, missing blobs, an invalid card, bad weights.
            ConflictError: the version exists with different content (versions are immutable).
        """

        names.check_owner(owner), names.check_name(name), names.check_version(version)
        if not isinstance(files, dict) or set(files) - set(PACKAGE_FILES) or CARD_FILE not in files:
            raise FormatError(f"a package's files must include {CARD_FILE} and be among {PACKAGE_FILES}; "
                              f"got {sorted(files)[:5] if isinstance(files, dict) else files!r:.80}")
        sizes = {}
        for path, sha in files.items():
            if not self.has_blob(sha):
                raise NotFoundError(f"file {path} (sha256 {sha:.64}) has not been uploaded; upload blobs first")
            sizes[path] = self.blob_path(sha).stat().st_size
        if sizes[CARD_FILE] > MAX_CARD_BYTES:  # refused before a byte of it is read
            raise TooLargeError(f"{CARD_FILE} is {sizes[CARD_FILE]:,} bytes; the limit is {MAX_CARD_BYTES:,}")
        with self.open_blob(files[CARD_FILE]) as f:
            card = parse_card(f.read(MAX_CARD_BYTES + 1))
        if README_FILE in files:
            if sizes[README_FILE] > MAX_README_BYTES:
                raise TooLargeError(f"{README_FILE} is {sizes[README_FILE]:,} bytes; the limit is "
                                    f"{MAX_README_BYTES:,}")
            with self.open_blob(files[README_FILE]) as f:
                check_readme(f.read(MAX_README_BYTES + 1))
        if (card.owner, card.name, card.version) != (owner, name, version):
            raise FormatError(f"{CARD_FILE} says {card.owner}/{card.name}@{card.version} but is published as "
                              f"{owner}/{name}@{version}; they must agree")
        if card.kind == "composition":
            if WEIGHTS_FILE in files:
                raise FormatError("a composition package has no weights")
        elif WEIGHTS_FILE not in files:
            raise FormatError(f"a {card.kind} module needs {WEIGHTS_FILE}")
        if WEIGHTS_FILE in files:
            self.check_weights(files[WEIGHTS_FILE])
        content = files.get(WEIGHTS_FILE, files[CARD_FILE])
        sv = names.SemVer.parse(version)
        conn = self.connect()
        try:
            with database.transaction(conn):
                row = conn.execute("SELECT id FROM versions WHERE owner=? AND name=? AND version=?",
                                   (owner, name, version)).fetchone()
                if row is not None:
                    have = dict(conn.execute("SELECT path, sha256 FROM files WHERE version_id=?", (row["id"],)))
                    if have != files:
                        raise ConflictError(f"{owner}/{name}@{version} already exists with different content; "
                                            "published versions are immutable: bump the version")
                else:
                    twin = conn.execute("SELECT name FROM versions WHERE owner=? AND lower(name)=lower(?) AND name!=? "
                                        "LIMIT 1", (owner, name, name)).fetchone()
                    if twin is not None:  # alice/Senti next to alice/senti would let one pose as the other
                        raise ConflictError(f"{owner}/{twin['name']} exists; {owner}/{name} differs from it only by "
                                            f"case: publish as {owner}/{twin['name']} or choose another name")
                    check_parents(conn, owner, card.lineage.parents)
                    self._insert(conn, owner, name, sv, card, files, sizes, content, uploader)
                    latest.refresh(conn, self.db, owner, name)
            return self.get(owner, name, version, conn=conn)
        finally:
            conn.close()

    def check_weights(self, sha256: str) -> None:
        """Check that blob ``sha256`` is valid safetensors, once: the verdict is remembered by content hash.

        Raises:
            IntegrityError: the blob is not valid safetensors (now, or when it was first checked).
        """
        conn = self.connect()
        try:
            row = conn.execute("SELECT error FROM checked WHERE sha256=? AND checker=?", (sha256, CHECKER)).fetchone()
        finally:
            conn.close()
        if row is not None:
            if row["error"] is not None:
                raise IntegrityError(row["error"])
            return
        error = None
        try:
            with self.open_blob(sha256) as f:
                check_safetensors(f, os.fstat(f.fileno()).st_size)
        except IntegrityError as exc:
            error = str(exc)
        conn = self.connect()
        try:
            with database.transaction(conn):
                conn.execute("INSERT INTO checked VALUES (?,?,?) ON CONFLICT (sha256) DO UPDATE SET "
                             "checker = excluded.checker, error = excluded.error", (sha256, CHECKER, error))
        finally:
            conn.close()
        if error is not None:
            raise IntegrityError(error)

    def _insert(self, conn, owner, name, sv, card, files, sizes, content, uploader) -> None:
        host = card.host or {}
        vid = conn.execute(
            "INSERT INTO versions (owner, name, version, major, minor, patch, prerelease, sha256, kind, architecture,"
            " task, language, license, description, card, size, uploader, created)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?) RETURNING id",
            (owner, name, str(sv), sv.major, sv.minor, sv.patch, json.dumps(sv.prerelease), content, card.kind,
             host.get("architecture"), card.task, card.language, card.license, card.description,
             json.dumps(card.to_dict(), sort_keys=True), sum(sizes.values()), uploader, time.time())).fetchone()[0]
        conn.executemany("INSERT INTO files VALUES (?,?,?,?)", [(vid, p, s, sizes[p]) for p, s in files.items()])
        conn.executemany("INSERT INTO tags VALUES (?,?)", [(vid, t) for t in dict.fromkeys(card.tags)])
        conn.executemany("INSERT INTO parents VALUES (?,?,?,?,?,?)",
                         [(vid, i, p.name, p.version, p.sha256, p.weight) for i, p in enumerate(card.lineage.parents)])

    def _row(self, conn, owner: str, name: str, version: str):
        if version == names.LATEST:
            return conn.execute("SELECT v.* FROM latest l JOIN versions v ON v.id = l.version_id "  # kept on write
                                "WHERE l.owner=? AND l.name=?", (owner, name)).fetchone()
        return conn.execute("SELECT * FROM versions WHERE owner=? AND name=? AND version=?",
                            (owner, name, version)).fetchone()

    def get(self, owner: str, name: str, version: str = names.LATEST, conn=None) -> VersionInfo:
        """The version ``owner/name@version`` (``latest``: the highest non-yanked release).

        Raises:
            InvalidNameError: a malformed part.
            NotFoundError: no such module or version.
        """
        names.check_owner(owner), names.check_name(name), names.check_version(version, allow_latest=True)
        own = conn is None
        conn = conn or self.connect()
        try:
            row = self._row(conn, owner, name, version)
            if row is None:
                known = [r[0] for r in conn.execute("SELECT version FROM versions WHERE owner=? AND name=?",
                                                    (owner, name))]
                hint = f"; versions: {', '.join(known[:10])} (all yanked?)" if known else ""
                raise NotFoundError(f"{owner}/{name}@{version} is not in the hub{hint}")
            return self._info(conn, row)
        finally:
            if own:
                conn.close()

    def _info(self, conn, row) -> VersionInfo:
        files = {r["path"]: {"sha256": r["sha256"], "size": r["size"]}
                 for r in conn.execute("SELECT * FROM files WHERE version_id=? ORDER BY path", (row["id"],))}
        return VersionInfo(owner=row["owner"], name=row["name"], version=row["version"], sha256=row["sha256"],
                           kind=row["kind"], card=json.loads(row["card"]), files=files, size=row["size"],
                           created=row["created"], uploader=row["uploader"], yanked=bool(row["yanked"]),
                           yank_reason=row["yank_reason"])

    def versions(self, owner: str, name: str) -> list[VersionInfo]:
        """Every version of ``owner/name``, newest first (yanked ones included, marked).

        Raises:
            NotFoundError: no such module.
        """
        names.check_owner(owner), names.check_name(name)
        conn = self.connect()
        try:
            rows = list(conn.execute("SELECT * FROM versions WHERE owner=? AND name=?", (owner, name)))
            if not rows:
                raise NotFoundError(f"module {owner}/{name} is not in the hub")
            rows.sort(key=lambda r: names.SemVer.parse(r["version"]), reverse=True)
            return [self._info(conn, r) for r in rows]
        finally:
            conn.close()

    def yank(self, owner: str, name: str, version: str, reason: str = "", yanked: bool = True) -> VersionInfo:
        """Mark a version yanked (hidden from ``latest`` and search, still pullable by exact version), or undo it.

        Raises:
            NotFoundError: no such version.
        """
        names.check_version(version)
        conn = self.connect()
        try:
            with database.transaction(conn):
                self.get(owner, name, version, conn=conn)
                conn.execute("UPDATE versions SET yanked=?, yank_reason=? WHERE owner=? AND name=? AND version=?",
                             (int(yanked), reason[:500] if yanked else None, owner, name, version))
                latest.refresh(conn, self.db, owner, name)
            return self.get(owner, name, version, conn=conn)
        finally:
            conn.close()

    def find_by_sha(self, sha256: str) -> list[VersionInfo]:
        """Versions whose content hash is ``sha256``."""
        conn = self.connect()
        try:
            return [self._info(conn, r) for r in conn.execute("SELECT * FROM versions WHERE sha256=?", (sha256,))]
        finally:
            conn.close()

    # -- maintenance -------------------------------------------------------------------------

    def check(self) -> list[str]:
        """Verify the store: every referenced blob present with the right sha256 and size, no leftovers.

        Returns:
            Problems found (empty when consistent).
        """

        problems = []
        conn = self.connect()
        try:
            for r in conn.execute("SELECT v.owner, v.name, v.version, f.path, f.sha256, f.size FROM files f "
                                  "JOIN versions v ON v.id = f.version_id"):
                p = self.blob_path(r["sha256"])
                where = f"{r['owner']}/{r['name']}@{r['version']}:{r['path']}"
                if not p.is_file():
                    problems.append(f"{where}: blob {r['sha256']} missing")
                elif p.stat().st_size != r["size"] or file_sha256(p) != r["sha256"]:
                    problems.append(f"{where}: blob {r['sha256']} corrupt")
            orphans = conn.execute("SELECT COUNT(*) FROM versions v WHERE NOT EXISTS "
                                   "(SELECT 1 FROM files f WHERE f.version_id = v.id AND f.path = ?)",
                                   (CARD_FILE,)).fetchone()[0]
            if orphans:
                problems.append(f"{orphans} versions without {CARD_FILE}")
            problems += self.db.integrity_problems(conn)
        finally:
            conn.close()
        leftovers = [p for p in self.tmp.iterdir() if not p.name.startswith(SLOT_PREFIX)]
        if leftovers:
            problems.append(f"{len(leftovers)} unfinished uploads in {self.tmp}")
        return problems

    def gc(self, older_than: float = STALE_TMP_SECONDS) -> int:
        """Remove blobs no version or derived artifact refers to (older than ``older_than`` s, so in-flight
        pushes survive)."""
        conn = self.connect()
        try:
            used = {r[0] for r in conn.execute("SELECT sha256 FROM files UNION SELECT sha256 FROM derived")}
        finally:
            conn.close()
        now, removed = time.time(), 0
        for p in self.blobs.glob("*/*"):
            if p.name not in used and now - p.stat().st_mtime >= older_than:
                p.unlink(missing_ok=True)
                removed += 1
        return removed
