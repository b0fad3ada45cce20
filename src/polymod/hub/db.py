"""The hub's metadata database: one interface, two backends (SQLite, embedded default; PostgreSQL).

A :class:`~polymod.hub.store.Store` keeps its blobs on disk and its metadata in a :class:`Database`:

* **SQLite** (default): ``index.sqlite`` in the store's directory, in WAL mode so readers never block the single
  writer, with a busy timeout so concurrent writers (threads of the server, or several local processes) queue
  instead of failing. Every write is one ``BEGIN IMMEDIATE`` transaction: a version becomes visible whole or not
  at all.
* **PostgreSQL** (:mod:`polymod.hub.pg`): selected by a ``postgresql://`` URL (``polymod hub serve --db URL`` or
  ``$POLYMOD_HUB_DB``). Same tables, same guarantees: each write transaction first takes one transaction-level
  advisory lock, so writers are serialised exactly as SQLite's single writer is, while readers never wait.

The SQL in the hub is written once for both: ``?`` placeholders, ``INSERT … ON CONFLICT``, ``RETURNING``. What
differs — column types, full-text search (FTS5 here, ``tsvector`` + GIN there), integrity checks — sits behind
the methods of :class:`Database`.

Tables: ``versions`` (one row per published version, its card as JSON), ``files`` (its files by sha256),
``tags``, ``parents`` (lineage edges as written in the card), ``users``, ``members`` (who may write to a
namespace), ``tokens`` (sha256 of each token, never the token), ``derived`` (router data computed from a module,
keyed by its content hash, the transform and its config: :mod:`polymod.hub.derived`), ``checked`` (the weights
check's verdict per blob, so identical content is never parsed twice); and, kept by :mod:`polymod.hub.latest`,
``latest`` (each module's latest version), ``search`` (the full-text index over those versions' names,
descriptions, tasks, languages and tags) and ``downloads``.

Schema changes: bump :data:`SCHEMA_VERSION`, change :data:`SCHEMA` (what a new database gets) and add the
statements that turn the previous version into the new one to :data:`MIGRATIONS`. Opening an older store applies
them in place, in one transaction; a store written by a newer polymod is refused.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from polymod.errors import BusyError, HubError
from polymod.hub import latest

SCHEMA_VERSION = 2
DB_ENV = "POLYMOD_HUB_DB"

# Portable DDL; {id}, {int}, {float} become each backend's types (PostgreSQL needs 64-bit sizes and
# double-precision timestamps where SQLite's INTEGER and REAL already are). The full-text table is per backend.
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE versions (
    id {id},
    owner TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL,
    major {int} NOT NULL, minor {int} NOT NULL, patch {int} NOT NULL, prerelease TEXT NOT NULL,
    sha256 TEXT NOT NULL, kind TEXT NOT NULL, architecture TEXT, task TEXT, language TEXT, license TEXT,
    description TEXT, card TEXT NOT NULL, size {int} NOT NULL, uploader TEXT, created {float} NOT NULL,
    yanked INTEGER NOT NULL DEFAULT 0, yank_reason TEXT,
    UNIQUE (owner, name, version)
);
CREATE INDEX versions_sha ON versions (sha256);
CREATE INDEX versions_module ON versions (owner, name);
CREATE TABLE files (
    version_id {int} NOT NULL REFERENCES versions(id), path TEXT NOT NULL,
    sha256 TEXT NOT NULL, size {int} NOT NULL, PRIMARY KEY (version_id, path)
);
CREATE INDEX files_sha ON files (sha256);
CREATE TABLE tags (version_id {int} NOT NULL REFERENCES versions(id), tag TEXT NOT NULL);
CREATE INDEX tags_version ON tags (version_id);
CREATE TABLE parents (
    child_id {int} NOT NULL REFERENCES versions(id), position INTEGER NOT NULL,
    name TEXT NOT NULL, version TEXT, sha256 TEXT, weight {float}, PRIMARY KEY (child_id, position)
);
CREATE INDEX parents_sha ON parents (sha256);
CREATE INDEX parents_name ON parents (name, version);
CREATE TABLE users (name TEXT PRIMARY KEY, created {float} NOT NULL);
CREATE TABLE members (namespace TEXT NOT NULL, username TEXT NOT NULL, PRIMARY KEY (namespace, username));
CREATE TABLE tokens (
    hash TEXT PRIMARY KEY, username TEXT NOT NULL REFERENCES users(name), label TEXT,
    created {float} NOT NULL, expires {float}, revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE derived (
    key TEXT PRIMARY KEY, module_sha TEXT NOT NULL, transform TEXT NOT NULL, config TEXT NOT NULL,
    sha256 TEXT NOT NULL, size {int} NOT NULL, parent TEXT, created {float} NOT NULL
);
CREATE INDEX derived_module ON derived (module_sha);
CREATE TABLE checked (sha256 TEXT PRIMARY KEY, checker TEXT NOT NULL, error TEXT)
"""

# MIGRATIONS[n]: the statements that turn a schema-(n-1) database into schema n (formatted like SCHEMA).
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 2: `user` is a reserved word in PostgreSQL; the two columns named so are renamed for portable SQL.
    2: ("ALTER TABLE members RENAME COLUMN user TO username",
        "ALTER TABLE tokens RENAME COLUMN user TO username"),
}


def statements(script: str, types: dict[str, str]) -> list[str]:
    """The ``;``-separated statements of ``script`` with the backend's ``types`` filled in."""
    return [s.strip().format(**types) for s in script.split(";") if s.strip()]


class Database:
    """Where a store's metadata lives. Subclasses: :class:`SQLiteDatabase`, :class:`polymod.hub.pg.PostgresDatabase`.

    Connections (:meth:`connect`) run in autocommit mode: each read sees the latest committed state, and writes
    go through :func:`transaction`. Rows are addressable by column name and by position.
    """

    backend = "?"
    types: dict[str, str] = {}

    def connect(self, busy_timeout: float = 60.0) -> Any:
        """A new connection (one per thread or operation); writes wait ``busy_timeout`` s for the write lock."""
        raise NotImplementedError

    def describe(self) -> str:
        """A human-readable name for messages (never contains a password)."""
        raise NotImplementedError

    def table_exists(self, conn: Any, table: str) -> bool:
        """Whether ``table`` exists."""
        raise NotImplementedError

    def search_schema(self) -> list[str]:
        """The DDL of this backend's full-text index."""
        raise NotImplementedError

    def index_search(self, conn: Any, version_id: int, fields: dict[str, str]) -> None:
        """Add version ``version_id``'s text ``fields`` (:data:`SEARCH_FIELDS`) to the full-text index, inside the
        write transaction (:func:`polymod.hub.latest.refresh` keeps each module's latest version there)."""
        raise NotImplementedError

    def unindex_search(self, conn: Any, version_id: int) -> None:
        """Remove version ``version_id`` from the full-text index."""
        raise NotImplementedError

    def text_search(self, words: list[str]) -> tuple[str, str, list[Any], str]:
        """SQL pieces matching the ``latest`` rows ``l`` whose indexed text has every word as a prefix of a token.

        Returns:
            ``(source, where, args, newest)``: a ``FROM`` clause holding ``latest l``, a condition, the arguments of
            both (in that order), and an ``ORDER BY`` expression listing the newest matches first (version id
            descending; :func:`polymod.hub.query.search` ranks a window of them).
        """
        raise NotImplementedError

    def integrity_problems(self, conn: Any) -> list[str]:
        """Problems the backend's own consistency check finds (empty when none)."""
        return []

    def close(self) -> None:
        """Release pooled connections (idempotent)."""

    def initialise(self) -> None:
        """Create the schema in a new database, or migrate an older one in place (idempotent, concurrency-safe).

        Raises:
            HubError: the database was written by a newer polymod (a schema version this one does not know).
        """
        conn = self.connect()
        try:
            with transaction(conn):
                have = None
                if self.table_exists(conn, "meta"):
                    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                    have = int(row[0]) if row is not None else None
                if have is None:
                    for statement in [*statements(SCHEMA, self.types), *self.search_schema()]:
                        conn.execute(statement)
                    conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif have > SCHEMA_VERSION:
                    raise HubError(f"the hub database {self.describe()} has schema version {have}, newer than this "
                                   f"polymod's {SCHEMA_VERSION}: upgrade polymod to open it")
                elif have < SCHEMA_VERSION:
                    for version in range(have + 1, SCHEMA_VERSION + 1):
                        for statement in MIGRATIONS[version]:
                            conn.execute(statement.format(**self.types))
                    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
                latest.ensure(conn, self)  # the search/page index, built once for stores older than it
        finally:
            conn.close()

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        conn = self.connect()
        try:
            return int(conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0])
        finally:
            conn.close()


def fts5_query(words: list[str]) -> str:
    """An FTS5 query: every word, quoted (so no word is an operator), as a prefix."""
    return " ".join('"{}"*'.format(w.replace('"', '""')) for w in words)


class SQLiteDatabase(Database):
    """The embedded backend: one SQLite file in WAL mode, FTS5 for text search.

    Args:
        path: the SQLite file (created if missing).
    """

    backend = "sqlite"
    types = {"id": "INTEGER PRIMARY KEY", "int": "INTEGER", "float": "REAL"}

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def describe(self) -> str:
        return str(self.path)

    def connect(self, busy_timeout: float = 60.0) -> sqlite3.Connection:
        conn = sqlite3.connect(str(self.path), timeout=busy_timeout, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    def table_exists(self, conn: Any, table: str) -> bool:
        return conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone() is not None

    def search_schema(self) -> list[str]:
        return ["CREATE VIRTUAL TABLE search USING fts5(owner, name, description, task, language, tags, kind, "
                "architecture, tokenize = 'unicode61', prefix = '2 3')"]  # prefix indexes: 2- and 3-letter prefixes

    def index_search(self, conn: Any, version_id: int, fields: dict[str, str]) -> None:
        conn.execute("INSERT INTO search (rowid, owner, name, description, task, language, tags, kind, architecture)"
                     " VALUES (?,?,?,?,?,?,?,?,?)", (version_id, *(fields[k] for k in SEARCH_FIELDS)))

    def unindex_search(self, conn: Any, version_id: int) -> None:
        conn.execute("DELETE FROM search WHERE rowid = ?", (version_id,))

    def text_search(self, words: list[str]) -> tuple[str, str, list[Any], str]:
        # CROSS JOIN keeps the full-text index as the outer loop: with a facet filter, SQLite's planner otherwise
        # drives from latest's facet index and re-runs MATCH per row (926 ms instead of 62 ms at 3,000 modules,
        # benchmarks/hub_search_backends.py; 3.3 s of CPU for one search at 100k versions, benchmarks/hub_load.py).
        # FTS5 then walks its rowids backwards, so the newest matches come without sorting every match.
        return ("search CROSS JOIN latest l ON l.version_id = search.rowid", "search MATCH ?", [fts5_query(words)],
                "search.rowid DESC")

    def integrity_problems(self, conn: Any) -> list[str]:
        ok = conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return [] if ok else ["SQLite integrity_check failed"]


SEARCH_FIELDS = ("owner", "name", "description", "task", "language", "tags", "kind", "architecture")


@contextmanager
def transaction(conn: Any) -> Iterator[Any]:
    """One write transaction (``BEGIN IMMEDIATE`` on SQLite, the global write lock on PostgreSQL), committed at
    the end of the block and rolled back on any exception.

    Raises:
        BusyError: the write lock was not free within the connection's busy timeout.
    """
    if not isinstance(conn, sqlite3.Connection):
        with conn.transaction():
            yield conn
        return
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise BusyError("the hub's index is busy with other writes; retry in a moment") from None
        raise
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


_PASSWORD = re.compile(r"(://[^:/@]*):[^@/]*@")


def redact(url: str) -> str:
    """``url`` without its password (for messages and files)."""
    return _PASSWORD.sub(r"\1@", url)
