"""The index search and pages read: each module's latest version, its full-text row, and download counts.

Search answers "the latest non-yanked version of every module" (releases before
pre-releases, then semantic-version order). Computing that from ``versions`` on
every query reads every version ever published, so it is kept instead, one row
per module, in the ``latest`` table, updated inside the same transaction as the
publish or yank that changes it (:func:`refresh`, which reads only that module's
versions). The FTS5 table ``search`` holds exactly those rows (rowid = the
version's id), so a text query never meets an old version, and the facet columns
sit in ``latest`` (tags in ``latest_tags``) beside indexes, so a filter reads one
row per matching module, never a card; ``facet_counts`` keeps each facet value's
count over all modules (the home page's facets without counting anything).

``downloads`` counts, per version, how often its ``module.json`` blob was served
by a hub server (every pull fetches it once; a client's cache answers repeats,
and ``HEAD`` requests are not counted).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from polymod.hub import names

if TYPE_CHECKING:
    from polymod.hub.db import Database

SCHEMA = """
CREATE TABLE IF NOT EXISTS latest (
    owner TEXT NOT NULL, name TEXT NOT NULL, version_id {int} NOT NULL UNIQUE REFERENCES versions(id),
    kind TEXT NOT NULL, architecture TEXT, task TEXT, language TEXT, created {float} NOT NULL,
    PRIMARY KEY (owner, name)
);
CREATE INDEX IF NOT EXISTS latest_created ON latest (created DESC, version_id DESC);
CREATE INDEX IF NOT EXISTS latest_owner ON latest (owner, created DESC);
CREATE INDEX IF NOT EXISTS latest_kind ON latest (kind, created DESC);
CREATE INDEX IF NOT EXISTS latest_architecture ON latest (architecture, created DESC);
CREATE INDEX IF NOT EXISTS latest_task ON latest (task, created DESC);
CREATE INDEX IF NOT EXISTS latest_language ON latest (language, created DESC);
CREATE INDEX IF NOT EXISTS tags_tag ON tags (tag, version_id);
CREATE INDEX IF NOT EXISTS versions_order ON versions (owner, name, major DESC, minor DESC, patch DESC);
CREATE TABLE IF NOT EXISTS latest_tags (tag TEXT NOT NULL, version_id {int} NOT NULL REFERENCES versions(id),
                                        PRIMARY KEY (tag, version_id));
CREATE INDEX IF NOT EXISTS latest_tags_version ON latest_tags (version_id);
CREATE TABLE IF NOT EXISTS facet_counts (facet TEXT NOT NULL, value TEXT NOT NULL, count {int} NOT NULL,
                                         PRIMARY KEY (facet, value));
CREATE TABLE IF NOT EXISTS downloads (version_id {int} PRIMARY KEY REFERENCES versions(id),
                                      count {int} NOT NULL);
"""

BUILT_KEY = "latest_index_v3"  # meta key: the latest/search/facet tables were (re)built from versions once
FACET_COLUMNS = ("kind", "architecture", "task", "language")


def _order_key(row) -> tuple:
    return (not json.loads(row["prerelease"]), names.SemVer.parse(row["version"]))


def _fts_fields(row, tags: list[str]) -> dict[str, str]:
    name = row["name"]
    return {"owner": row["owner"], "name": name.replace(".", " ").replace("-", " ").replace("_", " ") + " " + name,
            "description": row["description"] or "", "task": row["task"] or "", "language": row["language"] or "",
            "tags": " ".join(tags), "kind": row["kind"], "architecture": row["architecture"] or ""}


def _count_facets(conn, row, tags: list[str], step: int) -> None:
    """Add ``step`` (+1 or -1) to the counts of this version's facet values."""
    values = [(f, row[f]) for f in FACET_COLUMNS if row[f]] + [("tag", t) for t in tags]
    for facet, value in values:
        conn.execute("INSERT INTO facet_counts VALUES (?, ?, ?) ON CONFLICT (facet, value) DO UPDATE SET "
                     "count = facet_counts.count + excluded.count", (facet, value, step))
    if step < 0:
        conn.execute("DELETE FROM facet_counts WHERE count <= 0")


def refresh(conn, database: Database, owner: str, name: str) -> None:
    """Recompute ``owner/name``'s latest non-yanked version and its search row (call inside the write transaction).

    Reads only that module's versions; a module whose versions are all yanked leaves search.
    """
    rows = list(conn.execute("SELECT * FROM versions WHERE owner=? AND name=? AND yanked=0", (owner, name)))
    best = max(rows, key=_order_key) if rows else None
    old = conn.execute("SELECT version_id FROM latest WHERE owner=? AND name=?", (owner, name)).fetchone()
    old_id = old[0] if old is not None else None
    new_id = best["id"] if best is not None else None
    if old_id == new_id:
        return
    if old_id is not None:
        old_row = conn.execute("SELECT * FROM versions WHERE id=?", (old_id,)).fetchone()
        _count_facets(conn, old_row, _tags(conn, old_id), -1)
        database.unindex_search(conn, old_id)
        conn.execute("DELETE FROM latest_tags WHERE version_id=?", (old_id,))
        conn.execute("DELETE FROM latest WHERE owner=? AND name=?", (owner, name))
    if best is not None:
        tags = _tags(conn, best["id"])
        conn.execute("INSERT INTO latest VALUES (?,?,?,?,?,?,?,?)",
                     (owner, name, best["id"], best["kind"], best["architecture"], best["task"], best["language"],
                      best["created"]))
        conn.executemany("INSERT INTO latest_tags VALUES (?, ?)", [(t, best["id"]) for t in tags])
        database.index_search(conn, best["id"], _fts_fields(best, tags))
        _count_facets(conn, best, tags, +1)


def _tags(conn, version_id: int) -> list[str]:
    return [r[0] for r in conn.execute("SELECT tag FROM tags WHERE version_id=?", (version_id,))]


def rebuild(conn, database: Database) -> int:
    """Rebuild ``latest`` and ``search`` from ``versions`` (stores written before this index existed).

    Returns:
        The number of modules indexed.
    """
    for table in ("search", "latest", "latest_tags", "facet_counts"):
        conn.execute(f"DELETE FROM {table}")
    modules = list(conn.execute("SELECT DISTINCT owner, name FROM versions"))
    for owner, name in modules:
        refresh(conn, database, owner, name)
    conn.execute("INSERT INTO meta VALUES (?, '1') ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                 (BUILT_KEY,))
    return len(modules)


def ensure(conn, database: Database) -> None:
    """Create the tables and build them once for an older store (call inside a write transaction)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            conn.execute(statement.format(**database.types))
    if conn.execute("SELECT 1 FROM meta WHERE key=?", (BUILT_KEY,)).fetchone() is None:
        conn.execute("DROP TABLE IF EXISTS search")  # older stores: one row per version, no prefix index
        for statement in database.search_schema():
            conn.execute(statement)
        rebuild(conn, database)


def add_downloads(conn, counts: dict[str, int]) -> int:
    """Add download counts keyed by blob sha256; only ``module.json`` blobs count (each names one version).

    Returns:
        How many versions were counted.
    """
    counted = 0
    for sha, n in counts.items():
        for (vid,) in conn.execute("SELECT version_id FROM files WHERE path='module.json' AND sha256=?",
                                   (sha,)).fetchall():
            conn.execute("INSERT INTO downloads VALUES (?, ?) ON CONFLICT(version_id) DO UPDATE SET "
                         "count = downloads.count + excluded.count", (vid, n))
            counted += 1
    return counted


def downloads(conn, version_ids: list[int]) -> dict[int, int]:
    """Download counts of these versions (0 when never downloaded)."""
    if not version_ids:
        return {}
    marks = ",".join("?" * len(version_ids))
    found = dict(conn.execute(f"SELECT version_id, count FROM downloads WHERE version_id IN ({marks})",
                              version_ids).fetchall())
    return {v: found.get(v, 0) for v in version_ids}

