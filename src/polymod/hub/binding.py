"""Which database holds a store's metadata, and the check that a store's blobs and metadata belong together.

A store on SQLite needs no record: its ``index.sqlite`` sits beside its blobs. A store on PostgreSQL writes
``database.json`` into its directory when it is first opened — the database URL without its password, and the
random ``store_id`` that the database also keeps in its ``meta`` table — so that

* a later open without ``--db`` (a CLI command, a second process) finds the same database;
* a store is never paired with another store's database (its blobs would be missing) nor with a database while
  it holds an ``index.sqlite`` of its own (its versions would vanish from view). Both are refused with the fix.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from polymod.errors import ConfigError, HubError
from polymod.hub.db import DB_ENV, Database, SQLiteDatabase, redact
from polymod.hub.pg import PostgresDatabase

MARKER = "database.json"
INDEX = "index.sqlite"


def _recorded(root: Path) -> dict | None:
    try:
        return json.loads((root / MARKER).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise HubError(f"{root / MARKER} is unreadable ({exc}); it records which database holds this store's "
                       "metadata: restore it, or pass --db") from None


def open_database(root: Path, spec: str | None = None) -> Database:
    """The database of the store at ``root``.

    Args:
        root: the store's directory.
        spec: ``None`` (``$POLYMOD_HUB_DB`` when set, else the database this store was created with: its
            ``index.sqlite`` or the PostgreSQL database recorded in ``database.json``), ``"sqlite"`` (the
            store's ``index.sqlite``) or a ``postgresql://`` URL.

    Raises:
        ConfigError: an unknown kind of database URL.
        HubError: the store's metadata lives in another database than the one named.
    """
    return resolve(Path(root), spec if spec is not None else os.environ.get(DB_ENV) or None)


def resolve(root: Path, spec: str | None) -> Database:
    """The initialised database of the store at ``root`` (see :func:`open_database`)."""
    recorded = _recorded(root)
    if spec is None:
        spec = recorded["url"] if recorded else "sqlite"
    if spec == "sqlite" or spec.startswith("sqlite:"):
        if recorded:
            raise HubError(f"the store {root} keeps its metadata in PostgreSQL ({recorded['url']}), not SQLite: "
                           f"pass --db with that database's URL (or unset $POLYMOD_HUB_DB)")
        path = spec[len("sqlite:///"):] if spec.startswith("sqlite:///") else root / INDEX
        database: Database = SQLiteDatabase(path)
        database.initialise()
        return database
    if not spec.startswith(("postgresql://", "postgres://")):
        raise ConfigError(f"unknown hub database {redact(spec)!r}: expected 'sqlite' or a postgresql:// URL "
                          "(e.g. postgresql://hub@db.example:5432/polymod)")
    if recorded is None and (root / INDEX).exists():
        raise HubError(f"the store {root} already keeps its metadata in {root / INDEX}; a PostgreSQL database "
                       "cannot take over an existing SQLite store: serve it without --db, or start a new store "
                       "directory for PostgreSQL")
    database = PostgresDatabase(spec)
    database.initialise()
    _bind(root, database, spec, recorded)
    return database


def _bind(root: Path, database: Database, spec: str, recorded: dict | None) -> None:
    conn = database.connect()
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()
        store_id = row[0] if row is not None else None
        if store_id is None:
            store_id = recorded["store_id"] if recorded else uuid.uuid4().hex
            conn.execute("INSERT INTO meta VALUES ('store_id', ?) ON CONFLICT DO NOTHING", (store_id,))
            store_id = conn.execute("SELECT value FROM meta WHERE key = 'store_id'").fetchone()[0]
        elif recorded is None and conn.execute("SELECT 1 FROM versions LIMIT 1").fetchone() is not None:
            raise HubError(f"the database {database.describe()} already holds the metadata of another store "
                           f"(store id {store_id}) whose blobs are not in {root}: use that store's directory "
                           f"(shared by every hub server), or a new database for a new store")
    finally:
        conn.close()
    if recorded is not None and recorded.get("store_id") != store_id:
        raise HubError(f"the store {root} belongs to the database with store id {recorded.get('store_id')}, but "
                       f"{database.describe()} has store id {store_id}: pass the URL of the store's own database "
                       f"({recorded.get('url')})")
    if recorded is None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".{MARKER}.{os.getpid()}"
        tmp.write_text(json.dumps({"backend": "postgresql", "url": redact(spec), "store_id": store_id}, indent=1))
        os.replace(tmp, root / MARKER)
