"""Search and listings: full text (SQLite FTS5 or PostgreSQL tsvector, :mod:`polymod.hub.db`) plus facets over
the latest version of each module.

A query is split into words; each must match (as a prefix) one of the indexed
fields — owner, name (also split at ``.``, ``-``, ``_``), description, task,
language, tags, kind, host architecture. Facets filter exactly, and the answer
counts each facet's values among the hits so a page can offer them.

Every query reads the ``latest`` index (one row per module, kept on write by
:mod:`polymod.hub.latest`) and its full-text rows, never the version history:
a page of hits costs the page (plus, for a text query, ranking its matches), not
the size of the store. Pages are ``limit`` hits (at most :data:`MAX_LIMIT`) from
``offset`` (at most :data:`MAX_OFFSET`); facet counts list each facet's
:data:`FACET_VALUES` most frequent values.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from polymod.errors import ConfigError
from polymod.hub import latest, names
from polymod.hub.store import Store, VersionInfo

FACETS = ("kind", "architecture", "task", "language", "tag")
MAX_QUERY = 256
MAX_LIMIT = 100
MAX_OFFSET = 10_000
FACET_VALUES = 50
WINDOW = 300  # matching modules a query ranks and counts facets over (the most recently published)
MAX_VERSIONS_PAGE = 100


@dataclass
class SearchResult:
    """One page of hits (one summary per module: its latest non-yanked version), the total, facet counts
    (over ``facet_hits`` of the hits: all of them, or the newest :data:`WINDOW`), and where the next page
    starts (``next_offset``, None on the last page)."""

    hits: list[dict[str, Any]] = field(default_factory=list)
    total: int = 0
    facets: dict[str, dict[str, int]] = field(default_factory=dict)
    offset: int = 0
    limit: int = 20
    next_offset: int | None = None
    facet_hits: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the API's response body)."""
        return {"hits": self.hits, "total": self.total, "facets": self.facets, "offset": self.offset,
                "limit": self.limit, "next_offset": self.next_offset, "facet_hits": self.facet_hits}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SearchResult:
        """Inverse of :meth:`to_dict` (pagination fields optional, for older hubs)."""
        return cls(hits=list(data["hits"]), total=int(data["total"]), facets=dict(data["facets"]),
                   offset=int(data.get("offset", 0)), limit=int(data.get("limit", len(data["hits"]))),
                   next_offset=data.get("next_offset"), facet_hits=int(data.get("facet_hits", data["total"])))


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text[:MAX_QUERY])[:16]


def summary(row, downloads: int = 0) -> dict[str, Any]:
    """The fields of a version shown in lists."""
    card = json.loads(row["card"])
    return {"owner": row["owner"], "name": row["name"], "version": row["version"], "kind": row["kind"],
            "architecture": row["architecture"], "task": row["task"], "language": row["language"],
            "license": row["license"], "description": row["description"], "tags": card.get("tags", []),
            "metrics": card.get("metrics", {}), "sha256": row["sha256"], "created": row["created"],
            "downloads": downloads}


def _rows_in_order(conn, ids: list[int]) -> list[tuple[Any, int]]:
    """The version rows with these ids, in this order, each with its download count."""
    if not ids:
        return []
    marks = ",".join("?" * len(ids))
    rows = {r["id"]: r for r in conn.execute(f"SELECT * FROM versions WHERE id IN ({marks})", ids)}
    counts = latest.downloads(conn, ids)
    return [(rows[i], counts[i]) for i in ids if i in rows]


def _score(words: list[re.Pattern], row) -> int:
    """Relevance of a hit: per query word, 4 when it starts a word of the owner or name, 2 of the task, kind,
    architecture or language, 1 otherwise (the description or a tag: every hit matches every word somewhere)."""
    name = f"{row['owner']} {row['name']}".replace("_", " ")
    facets = " ".join(row[f] or "" for f in latest.FACET_COLUMNS)
    return sum(4 if w.search(name) else 2 if w.search(facets) else 1 for w in words)


def _filters(owner: str | None, facets: dict[str, str | None]) -> tuple[list[str], list[str]]:
    where, args = [], []
    if owner:
        where.append("l.owner = ?"), args.append(owner)
    for facet, value in facets.items():
        if value is None or value == "":
            continue
        if facet == "tag":
            where.append("l.version_id IN (SELECT version_id FROM latest_tags WHERE tag = ?)")
        else:
            where.append(f"l.{facet} = ?")
        args.append(str(value)[:MAX_QUERY])
    return where, args


def _top(counts: dict[str, int]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:FACET_VALUES])


def _window_facets(conn, window: list) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {f: {} for f in FACETS}
    for r in window:
        for f in latest.FACET_COLUMNS:
            if r[f]:
                counts[f][r[f]] = counts[f].get(r[f], 0) + 1
    ids = [r["version_id"] for r in window]
    for i in range(0, len(ids), 900):
        chunk = ids[i:i + 900]
        sql = f"SELECT tag FROM latest_tags WHERE version_id IN ({','.join('?' * len(chunk))})"  # by version
        for (tag,) in conn.execute(sql, chunk):
            counts["tag"][tag] = counts["tag"].get(tag, 0) + 1
    return {f: _top(c) for f, c in counts.items()}


def _all_facets(conn) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {f: {} for f in FACETS}
    for facet, value, n in conn.execute("SELECT facet, value, count FROM facet_counts"):
        counts[facet][value] = n
    return {f: _top(c) for f, c in counts.items()}


def search(store: Store, query: str = "", limit: int = 20, offset: int = 0, owner: str | None = None,
           **facets: str | None) -> SearchResult:
    """Search the store.

    Ranking and facet counts read a bounded window: the :data:`WINDOW` most recently published
    matching modules. A query with at most that many hits is ranked and counted exactly; one with more
    ranks its newest :data:`WINDOW` by relevance, lists the rest after them newest first, and counts
    facets among that window (``facet_hits`` says how many hits the counts cover). ``total`` is always
    exact, and so are the facets of the unfiltered listing (kept on write).

    Args:
        store: the store.
        query: free text (empty: everything).
        limit: at most this many hits (1–100).
        offset: skip this many hits (pagination, 0–10,000; the result's ``next_offset`` is the next page's).
        owner: only this owner's modules.
        **facets: exact filters among ``kind``, ``architecture``, ``task``, ``language``, ``tag``.

    Returns:
        A :class:`SearchResult`, hits ranked by relevance (:func:`_score`, then newest first; newest first
        without a query).

    Raises:
        ConfigError: an unknown facet, a bad limit or offset.
    """

    unknown = set(facets) - set(FACETS)
    if unknown:
        raise ConfigError(f"unknown search facets {sorted(unknown)}; expected some of {FACETS}")
    if not 1 <= limit <= MAX_LIMIT or not 0 <= offset <= MAX_OFFSET:
        raise ConfigError(f"limit must be 1..{MAX_LIMIT} and offset 0..{MAX_OFFSET:,}, got limit={limit}, "
                          f"offset={offset}: narrow the query or the facets to reach later hits")
    if owner is not None:
        names.check_owner(owner)
    where, args = _filters(owner, facets)
    words = _words(query or "")
    columns = "l.version_id, l.kind, l.architecture, l.task, l.language, l.created"
    conn = store.connect()
    try:
        if words:  # the window is the newest matches (the backend's order), ranked here
            source, text_where, text_args, order = store.db.text_search(words)
            cond, args = " AND ".join([text_where, *where]), [*text_args, *args]
            total = conn.execute(f"SELECT COUNT(*) FROM {source} WHERE {cond}", args).fetchone()[0]
            window = conn.execute(f"SELECT {columns}, l.owner, l.name FROM {source} WHERE {cond} ORDER BY {order} "
                                  f"LIMIT {WINDOW}", args).fetchall()
            patterns = [re.compile(r"\b" + re.escape(w), re.IGNORECASE) for w in words]
            window.sort(key=lambda r: (-_score(patterns, r), -r["created"], -r["version_id"]))
        else:
            source, cond, order = "latest l", " AND ".join(where) or "1=1", "l.created DESC, l.version_id DESC"
            total = conn.execute(f"SELECT COUNT(*) FROM {source} WHERE {cond}", args).fetchone()[0]
            window = [] if not where else conn.execute(  # the unfiltered listing's facets are kept on write
                f"SELECT {columns} FROM {source} WHERE {cond} ORDER BY {order} LIMIT {WINDOW}", args).fetchall()
        ids = [r["version_id"] for r in window[offset:offset + limit]]
        if offset + limit > len(window) and len(window) < total:  # past the window: newest first
            start = max(offset, len(window))
            ids += [r[0] for r in conn.execute(f"SELECT l.version_id FROM {source} WHERE {cond} ORDER BY {order} "
                                               "LIMIT ? OFFSET ?", [*args, offset + limit - start, start])]
        if not words and not where:
            counts, covered = _all_facets(conn), total
        else:
            counts, covered = _window_facets(conn, window), len(window)
        hits = [summary(r, n) for r, n in _rows_in_order(conn, ids)]
        more = offset + len(ids) < total and offset + limit <= MAX_OFFSET
        return SearchResult(hits, total, counts, offset, limit, offset + limit if more else None, covered)
    finally:
        conn.close()


def version_page(store: Store, owner: str, name: str, offset: int = 0,
                 limit: int = 20) -> tuple[list[VersionInfo], int]:
    """A page of ``owner/name``'s versions, newest first by semantic version (yanked ones included, marked).

    Reads the page (and the pre-releases that share its last ``major.minor.patch``), not every version.

    Returns:
        (the page, how many versions the module has).

    Raises:
        ConfigError: a bad limit or offset.
        NotFoundError: no such module.
    """
    names.check_owner(owner), names.check_name(name)
    if not 1 <= limit <= MAX_VERSIONS_PAGE or offset < 0:
        raise ConfigError(f"limit must be 1..{MAX_VERSIONS_PAGE} and offset >= 0, got limit={limit}, offset={offset}")
    conn = store.connect()
    try:
        total = conn.execute("SELECT COUNT(*) FROM versions WHERE owner=? AND name=?", (owner, name)).fetchone()[0]
        if total == 0:
            store.versions(owner, name)  # raises NotFoundError with the store's message
        order = "ORDER BY major DESC, minor DESC, patch DESC"
        head = list(conn.execute(f"SELECT * FROM versions WHERE owner=? AND name=? {order} LIMIT ?",
                                 (owner, name, offset + limit)))
        if head:  # pre-release order inside one major.minor.patch is SemVer's, not SQL's: take the whole group
            last = head[-1]
            ids = {r["id"] for r in head}
            head += [r for r in conn.execute("SELECT * FROM versions WHERE owner=? AND name=? AND major=? AND "
                                             "minor=? AND patch=?", (owner, name, last["major"], last["minor"],
                                                                      last["patch"])) if r["id"] not in ids]
        head.sort(key=lambda r: names.SemVer.parse(r["version"]), reverse=True)
        page = head[offset:offset + limit]
        counts = latest.downloads(conn, [r["id"] for r in page])
        out = []
        for r in page:
            info = store._info(conn, r)
            info.downloads = counts[r["id"]]
            out.append(info)
        return out, total
    finally:
        conn.close()


def downloads_of(store: Store, info: VersionInfo) -> int:
    """How many times a hub server served ``info``'s ``module.json`` (its pulls)."""
    conn = store.connect()
    try:
        row = conn.execute("SELECT d.count FROM downloads d JOIN versions v ON v.id = d.version_id "
                           "WHERE v.owner=? AND v.name=? AND v.version=?",
                           (info.owner, info.name, info.version)).fetchone()
        return row[0] if row is not None else 0
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
