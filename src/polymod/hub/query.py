"""Search: full text (SQLite FTS5) plus facets over the latest version of each module.

A query is split into words; each must match (as a prefix) one of the indexed
fields — owner, name (also split at ``.``, ``-``, ``_``), description, task,
language, tags, kind, host architecture. Facets filter exactly, and the answer
counts each facet's values among the hits so a page can offer them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from polymod.errors import ConfigError
from polymod.hub import names
from polymod.hub.store import Store

FACETS = ("kind", "architecture", "task", "language", "tag")
MAX_QUERY = 256


@dataclass
class SearchResult:
    """Hits (one summary per module: its latest non-yanked version), total, and facet counts."""

    hits: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    facets: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"hits": self.hits, "total": self.total, "facets": self.facets}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        return cls(hits=list(data["hits"]), total=int(data["total"]), facets=dict(data["facets"]))


def _fts_query(text: str) -> str:
    words = re.findall(r"\w+", text[:MAX_QUERY])[:16]
    return " ".join(f'"{w}"*' for w in words)


def _latest_ids(conn, where: str = "1", args: tuple = ()) -> list[int]:
    """Ids of the latest non-yanked version of each module (releases preferred over pre-releases)."""
    best: dict[tuple[str, str], tuple] = {}
    sql = f"SELECT id, owner, name, version, prerelease FROM versions WHERE yanked=0 AND {where}"
    for r in conn.execute(sql, args):
        key = (not json.loads(r["prerelease"]), names.SemVer.parse(r["version"]))
        if (r["owner"], r["name"]) not in best or key > best[(r["owner"], r["name"])][0]:
            best[(r["owner"], r["name"])] = (key, r["id"])
    return [v[1] for v in best.values()]


def summary(row) -> dict[str, Any]:
    """The fields of a version shown in lists."""
    card = json.loads(row["card"])
    return {"owner": row["owner"], "name": row["name"], "version": row["version"], "kind": row["kind"],
            "architecture": row["architecture"], "task": row["task"], "language": row["language"],
            "license": row["license"], "description": row["description"], "tags": card.get("tags", []),
            "metrics": card.get("metrics", {}), "sha256": row["sha256"], "created": row["created"]}


def search(store: Store, query: str = "", limit: int = 20, offset: int = 0, owner: str | None = None,
           **facets: str | None) -> SearchResult:
    """Search the store.

    Args:
        store: the store.
        query: free text (empty: everything).
        limit: at most this many hits (1–100).
        offset: skip this many hits (pagination).
        owner: only this owner's modules.
        **facets: exact filters among ``kind``, ``architecture``, ``task``, ``language``, ``tag``.

    Returns:
        A :class:`SearchResult`, hits ranked by relevance (newest first without a query).

    Raises:
        ConfigError: an unknown facet or a bad limit.
    """

    unknown = set(facets) - set(FACETS)
    if unknown:
        raise ConfigError(f"unknown search facets {sorted(unknown)}; expected some of {FACETS}")
    if not 1 <= limit <= 100 or offset < 0:
        raise ConfigError(f"limit must be 1..100 and offset >= 0, got limit={limit}, offset={offset}")
    if owner is not None:
        names.check_owner(owner)
    conn = store.connect()
    try:
        ids = _latest_ids(conn)
        if not ids:
            return SearchResult(facets={f: {} for f in FACETS})
        marks = ",".join("?" * len(ids))
        sql, args = f"SELECT v.* FROM versions v WHERE v.id IN ({marks})", list(ids)
        order = "v.created DESC"
        fts = _fts_query(query or "")
        if fts:
            sql = (f"SELECT v.* FROM search s JOIN versions v ON v.id = s.rowid "
                   f"WHERE search MATCH ? AND v.id IN ({marks})")
            args = [fts, *ids]
            order = "bm25(search), v.created DESC"
        if owner:
            sql, args = sql + " AND v.owner = ?", [*args, owner]
        for facet, value in facets.items():
            if value is None or value == "":
                continue
            if facet == "tag":
                sql += " AND EXISTS (SELECT 1 FROM tags t WHERE t.version_id = v.id AND t.tag = ?)"
            else:
                sql += f" AND v.{facet} = ?"
            args.append(str(value)[:MAX_QUERY])
        rows = list(conn.execute(f"{sql} ORDER BY {order}", args))
        counts: dict[str, dict[str, int]] = {f: {} for f in FACETS}
        for r in rows:
            for f in FACETS[:-1]:
                if r[f]:
                    counts[f][r[f]] = counts[f].get(r[f], 0) + 1
            for t in set(json.loads(r["card"]).get("tags", [])):
                counts["tag"][t] = counts["tag"].get(t, 0) + 1
        facet_counts = {f: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for f, c in counts.items()}
        return SearchResult([summary(r) for r in rows[offset:offset + limit]], len(rows), facet_counts)
    finally:
        conn.close()


def owner_modules(store: Store, owner: str) -> list[dict[str, Any]]:
    """Every module of ``owner``: the latest version's summary plus its version count (yanked-only ones too)."""
    names.check_owner(owner)
    conn = store.connect()
    try:
        out = []
        modules = sorted({r[0] for r in conn.execute("SELECT name FROM versions WHERE owner=?", (owner,))})
        for name in modules:
            rows = list(conn.execute("SELECT * FROM versions WHERE owner=? AND name=?", (owner, name)))
            live = [r for r in rows if not r["yanked"]] or rows
            top = max(live, key=lambda r: (not json.loads(r["prerelease"]), names.SemVer.parse(r["version"])))
            out.append({**summary(top), "versions": len(rows), "all_yanked": not any(not r["yanked"] for r in rows)})
        return out
    finally:
        conn.close()
