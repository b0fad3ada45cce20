"""Lineage graphs: a version's ancestors and descendants.

A card's ``lineage.parents`` name each parent by ``name`` (a hub reference
``owner/name``, or a plain name meaning the child's own namespace), ``version``
and ``sha256`` (the parent's content hash). A parent is resolved by its
sha256 first — content, not names, is the identity — then by name and
version. Parents not in this hub stay in the graph as external nodes.
"""

from __future__ import annotations

import json
from typing import Any

from polymod.hub import names
from polymod.hub.store import Store

MAX_NODES = 500


def _node_id(row) -> str:
    return f"{row['owner']}/{row['name']}@{row['version']}"


def _node(row, role: str) -> dict[str, Any]:
    return {"id": _node_id(row), "owner": row["owner"], "name": row["name"], "version": row["version"],
            "sha256": row["sha256"], "kind": row["kind"], "yanked": bool(row["yanked"]), "role": role,
            "in_hub": True}


def _resolve_parent(conn, child, p) -> Any:
    if p["sha256"]:
        row = conn.execute("SELECT * FROM versions WHERE sha256=? ORDER BY created LIMIT 1", (p["sha256"],)).fetchone()
        if row is not None:
            return row
    owner, _, name = p["name"].rpartition("/")
    owner = owner or child["owner"]
    if p["version"]:
        return conn.execute("SELECT * FROM versions WHERE owner=? AND name=? AND version=?",
                            (owner, name, p["version"])).fetchone()
    return None


def _children(conn, row) -> list:
    """Versions naming ``row`` as a parent, by content hash or by name and version."""
    sql = ("SELECT DISTINCT v.* FROM parents p JOIN versions v ON v.id = p.child_id WHERE p.sha256 = ? "
           "OR (p.version = ? AND (p.name = ? OR (p.name = ? AND v.owner = ?)))")
    return list(conn.execute(sql, (row["sha256"], row["version"], f"{row['owner']}/{row['name']}",
                                   row["name"], row["owner"])))


def lineage(store: Store, owner: str, name: str, version: str = names.LATEST, depth: int = 8) -> dict[str, Any]:
    """The lineage graph around ``owner/name@version``.

    Args:
        store: the store.
        owner, name, version: the version at the centre (``latest`` allowed).
        depth: how many generations to follow up (ancestors) and down (descendants).

    Returns:
        ``{"root": id, "nodes": [...], "edges": [{"parent", "child", "weight", "recipe"}]}``
        with node ids ``owner/name@version`` (``name@version`` or a sha256 prefix for
        parents outside the hub) and node ``role`` ``self``, ``ancestor`` or ``descendant``.

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
        frontier = [start]
        for _ in range(depth):  # descendants
            nxt = []
            for parent in frontier:
                for row in _children(conn, parent):
                    cid = _node_id(row)
                    if cid not in nodes and len(nodes) < MAX_NODES:
                        nodes[cid] = _node(row, "descendant")
                        nxt.append(row)
                    edge = {"parent": _node_id(parent), "child": cid, "weight": None,
                            "recipe": json.loads(row["card"]).get("lineage", {}).get("recipe", {})}
                    if not any(e["parent"] == edge["parent"] and e["child"] == cid for e in edges):
                        edges.append(edge)
            frontier = nxt
        return {"root": _node_id(start), "nodes": list(nodes.values()), "edges": edges}
    finally:
        conn.close()
