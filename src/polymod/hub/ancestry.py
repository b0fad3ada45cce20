"""Lineage graphs: a version's ancestors and descendants.

A card's ``lineage.parents`` name each parent by ``name`` (a hub reference
``owner/name``, or a plain name meaning the child's own namespace), ``version``
and ``sha256`` (the parent's content hash). Parents are what the publisher
declares, verified by the hub: a declared ``name@version`` that exists here is
that version, and its content hash must match the declared one (checked on
publish, :func:`~polymod.hub.store.check_parents`). Only a parent whose declared name is not here
(renamed, or published elsewhere) is found by its content hash, and only when
one module holds that hash: a copy of someone's weights published first cannot
capture later modules' lineage. Parents not found stay as external nodes.

Anyone may declare any module a parent, so descendants are bounded: at most
:data:`MAX_CHILDREN` per version per page (``offset`` pages through the
centre's direct descendants), and the graph says how many there are.
"""

from __future__ import annotations

import json
from typing import Any

from polymod.hub import names
from polymod.hub.store import Store, declared_parent

MAX_NODES = 500
MAX_CHILDREN = 12


def _node_id(row) -> str:
    return f"{row['owner']}/{row['name']}@{row['version']}"


def _node(row, role: str) -> dict[str, Any]:
    return {"id": _node_id(row), "owner": row["owner"], "name": row["name"], "version": row["version"],
            "sha256": row["sha256"], "kind": row["kind"], "yanked": bool(row["yanked"]), "role": role,
            "in_hub": True}


def _resolve_parent(conn, child, p) -> Any:
    row = declared_parent(conn, child["owner"], p["name"], p["version"])
    if row is not None or not p["sha256"]:
        return row
    rows = conn.execute("SELECT * FROM versions WHERE sha256=? ORDER BY created LIMIT 50", (p["sha256"],)).fetchall()
    modules = {(r["owner"], r["name"]) for r in rows}
    return rows[0] if len(modules) == 1 else None  # several modules hold this content: ambiguous, not guessed


_CHILDREN = ("FROM parents p JOIN versions v ON v.id = p.child_id WHERE p.sha256 = ? "
             "OR (p.version = ? AND (p.name = ? OR (p.name = ? AND v.owner = ?)))")


def _children(conn, row, offset: int = 0) -> tuple[list, int]:
    """A page of the versions naming ``row`` as a parent (oldest first) and how many there are in all.

    Candidates are re-checked with :func:`_resolve_parent`, so a child counts only if its parent really is ``row``.
    """
    args = (row["sha256"], row["version"], f"{row['owner']}/{row['name']}", row["name"], row["owner"])
    found, total = [], 0
    for cand in conn.execute(f"SELECT DISTINCT v.* {_CHILDREN} ORDER BY v.created, v.id LIMIT 5000", args):
        parents = conn.execute("SELECT * FROM parents WHERE child_id=?", (cand["id"],)).fetchall()
        if any((r := _resolve_parent(conn, cand, p)) is not None and r["id"] == row["id"] for p in parents):
            if offset <= total < offset + MAX_CHILDREN:
                found.append(cand)
            total += 1
    return found, total


def lineage(store: Store, owner: str, name: str, version: str = names.LATEST, depth: int = 8,
            offset: int = 0) -> dict[str, Any]:
    """The lineage graph around ``owner/name@version``.

    Args:
        store: the store.
        owner, name, version: the version at the centre (``latest`` allowed).
        depth: how many generations to follow up (ancestors) and down (descendants).
        offset: the first of the centre's direct descendants to show (pages of :data:`MAX_CHILDREN`).

    Returns:
        ``{"root": id, "nodes": [...], "edges": [{"parent", "child", "weight", "recipe"}],
        "children": {"total", "offset", "limit"}}`` with node ids ``owner/name@version``
        (``name@version`` or a sha256 prefix for parents outside the hub), node ``role``
        ``self``, ``ancestor`` or ``descendant``, and ``more`` on a node with unshown descendants.

    Raises:
        NotFoundError: no such version.
    """

    root = store.get(owner, name, version)
    conn = store.connect()
    try:
        start = conn.execute("SELECT * FROM versions WHERE owner=? AND name=? AND version=?",
                             (root.owner, root.name, root.version)).fetchone()
        nodes = {_node_id(start): _node(start, "self")}
        edges: list[dict[str, Any]] = []
        frontier = [start]
        for _ in range(depth):  # ancestors, breadth first
            nxt = []
            for child in frontier:
                recipe = json.loads(child["card"]).get("lineage", {}).get("recipe", {})
                for p in conn.execute("SELECT * FROM parents WHERE child_id=? ORDER BY position", (child["id"],)):
                    row = _resolve_parent(conn, child, p)
                    if row is not None:
                        pid = _node_id(row)
                        if pid not in nodes and len(nodes) < MAX_NODES:
                            nodes[pid] = _node(row, "ancestor")
                            nxt.append(row)
                    else:
                        pid = f"{p['name']}@{p['version']}" if p["version"] else (p["sha256"] or p["name"])[:16]
                        nodes.setdefault(pid, {"id": pid, "name": p["name"], "version": p["version"],
                                               "sha256": p["sha256"], "role": "ancestor", "in_hub": False})
                    edges.append({"parent": pid, "child": _node_id(child), "weight": p["weight"], "recipe": recipe})
            frontier = nxt
        frontier, children = [start], {"total": 0, "offset": offset, "limit": MAX_CHILDREN}
        for level in range(depth):  # descendants, a bounded page per version
            nxt = []
            for parent in frontier:
                page, total = _children(conn, parent, offset if level == 0 else 0)
                if level == 0:
                    children["total"] = total
                if total > len(page):
                    nodes[_node_id(parent)]["more"] = total - len(page)
                for row in page:
                    cid = _node_id(row)
                    if cid not in nodes and len(nodes) < MAX_NODES:
                        nodes[cid] = _node(row, "descendant")
                        nxt.append(row)
                    edge = {"parent": _node_id(parent), "child": cid, "weight": None,
                            "recipe": json.loads(row["card"]).get("lineage", {}).get("recipe", {})}
                    if not any(e["parent"] == edge["parent"] and e["child"] == cid for e in edges):
                        edges.append(edge)
            frontier = nxt
        return {"root": _node_id(start), "nodes": list(nodes.values()), "edges": edges, "children": children}
    finally:
        conn.close()
