"""The store's SQLite index: schema and connections.

One file, ``index.sqlite``, in WAL mode so readers never block the single
writer, with a busy timeout so concurrent writers (threads of the server, or
several local processes) queue instead of failing. Every write is one
``BEGIN IMMEDIATE`` transaction: a version becomes visible whole or not at all.

Tables: ``versions`` (one row per published version, its card as JSON),
``files`` (its files by sha256), ``tags``, ``parents`` (lineage edges as
written in the card), ``users``, ``members`` (who may write to a namespace),
``tokens`` (sha256 of each token, never the token), ``derived`` (router data
computed from a module, keyed by its content hash, the transform and its
config: :mod:`polymod.hub.derived`), ``checked`` (the weights check's verdict
per blob, so identical content is never parsed twice), and ``search``, an FTS5
full-text index over names, descriptions, tasks, languages and tags.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from polymod.errors import BusyError
from polymod.hub import latest

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    id INTEGER PRIMARY KEY,
    owner TEXT NOT NULL, name TEXT NOT NULL, version TEXT NOT NULL,
    major INTEGER NOT NULL, minor INTEGER NOT NULL, patch INTEGER NOT NULL, prerelease TEXT NOT NULL,
    sha256 TEXT NOT NULL, kind TEXT NOT NULL, architecture TEXT, task TEXT, language TEXT, license TEXT,
    description TEXT, card TEXT NOT NULL, size INTEGER NOT NULL, uploader TEXT, created REAL NOT NULL,
    yanked INTEGER NOT NULL DEFAULT 0, yank_reason TEXT,
    UNIQUE (owner, name, version)
);
CREATE INDEX IF NOT EXISTS versions_sha ON versions (sha256);
CREATE INDEX IF NOT EXISTS versions_module ON versions (owner, name);
CREATE TABLE IF NOT EXISTS files (
    version_id INTEGER NOT NULL REFERENCES versions(id), path TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (version_id, path)
);
CREATE INDEX IF NOT EXISTS files_sha ON files (sha256);
CREATE TABLE IF NOT EXISTS tags (version_id INTEGER NOT NULL REFERENCES versions(id), tag TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS tags_version ON tags (version_id);
CREATE TABLE IF NOT EXISTS parents (
    child_id INTEGER NOT NULL REFERENCES versions(id), position INTEGER NOT NULL,
    name TEXT NOT NULL, version TEXT, sha256 TEXT, weight REAL, PRIMARY KEY (child_id, position)
);
CREATE INDEX IF NOT EXISTS parents_sha ON parents (sha256);
CREATE INDEX IF NOT EXISTS parents_name ON parents (name, version);
CREATE TABLE IF NOT EXISTS users (name TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS members (namespace TEXT NOT NULL, user TEXT NOT NULL, PRIMARY KEY (namespace, user));
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, user TEXT NOT NULL REFERENCES users(name), label TEXT,
    created REAL NOT NULL, expires REAL, revoked INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS derived (
    key TEXT PRIMARY KEY, module_sha TEXT NOT NULL, transform TEXT NOT NULL, config TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, parent TEXT, created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS derived_module ON derived (module_sha);
CREATE TABLE IF NOT EXISTS checked (sha256 TEXT PRIMARY KEY, checker TEXT NOT NULL, error TEXT);
CREATE VIRTUAL TABLE IF NOT EXISTS search USING fts5(
    owner, name, description, task, language, tags, kind, architecture, tokenize = 'unicode61'
);
"""


def connect(path: Path, busy_timeout: float = 60.0) -> sqlite3.Connection:
    """Open the index at ``path`` (autocommit mode; callers open transactions explicitly).

    Args:
        path: the SQLite file.
        busy_timeout: seconds a write waits for the lock before :class:`~polymod.errors.BusyError`.
    """
    conn = sqlite3.connect(str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


def initialise(path: Path) -> None:
    """Create the schema if it is missing (idempotent, safe under concurrency)."""
    conn = connect(path)
    try:
        with transaction(conn):
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            latest.ensure(conn)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
    finally:
        conn.close()


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception."""
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
