"""Draw a lineage graph as an inline SVG picture (no JavaScript, no external assets).

Layout: generations in rows — ancestors above the module, descendants below —
nodes spread evenly in each row, an arrow from each parent to its child, the
module itself highlighted. Every label is XML-escaped.
"""

from __future__ import annotations

from html import escape
from typing import Any

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 190, 46, 24, 56, 16
COLOURS = {"self": "#ffe8a3", "ancestor": "#dbeafe", "descendant": "#dcfce7", "external": "#eeeeee"}


def _levels(graph: dict[str, Any]) -> dict[str, int]:
    """Generation of every node relative to the root (negative: ancestors)."""
    level = {graph["root"]: 0}
    parents: dict[str, list[str]] = {}
    children: dict[str, list[str]] = {}
    for e in graph["edges"]:
        parents.setdefault(e["child"], []).append(e["parent"])
        children.setdefault(e["parent"], []).append(e["child"])
    frontier = [graph["root"]]
    while frontier:  # ancestors: one row up per generation
        nxt = []
        for n in frontier:
            for p in parents.get(n, []):
                if p not in level:
                    level[p] = level[n] - 1
                    nxt.append(p)
        frontier = nxt
    frontier = [graph["root"]]
    while frontier:  # descendants: one row down per generation
        nxt = []
        for n in frontier:
            for c in children.get(n, []):
                if c not in level:
                    level[c] = level[n] + 1
                    nxt.append(c)
        frontier = nxt
    for node in graph["nodes"]:
        level.setdefault(node["id"], 0)
    return level


def lineage_svg(graph: dict[str, Any], link: str = "/m/") -> str:
    """An ``<svg>`` element drawing ``graph`` (the output of :func:`polymod.hub.ancestry.lineage`).

    Args:
        graph: nodes and edges.
        link: URL prefix for nodes in the hub (``link + owner/name/version``).
    """
    level = _levels(graph)
    rows: dict[int, list[dict[str, Any]]] = {}
    for node in graph["nodes"]:
        rows.setdefault(level[node["id"]], []).append(node)
    top, widest = min(rows), max(len(r) for r in rows.values())
    width = PAD * 2 + widest * BOX_W + (widest - 1) * GAP_X
    height = PAD * 2 + len(rows) * BOX_H + (len(rows) - 1) * GAP_Y
    pos: dict[str, tuple[float, float]] = {}
    for lv, nodes in rows.items():
        span = len(nodes) * BOX_W + (len(nodes) - 1) * GAP_X
        x0 = (width - span) / 2
        for i, node in enumerate(sorted(nodes, key=lambda n: n["id"])):
            pos[node["id"]] = (x0 + i * (BOX_W + GAP_X), PAD + (lv - top) * (BOX_H + GAP_Y))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="lineage" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="lineage graph of {escape(graph["root"])}">',
           '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="#555"/></marker></defs>']
    for e in graph["edges"]:
        if e["parent"] in pos and e["child"] in pos:
            (px, py), (cx, cy) = pos[e["parent"]], pos[e["child"]]
            label = f"weight {e['weight']:g}" if isinstance(e.get("weight"), (int, float)) else ""
            out.append(f'<line class="edge" x1="{px + BOX_W / 2:.0f}" y1="{py + BOX_H:.0f}" x2="{cx + BOX_W / 2:.0f}" '
                       f'y2="{cy:.0f}" stroke="#555" stroke-width="1.5" marker-end="url(#arrow)">'
                       f'<title>{escape(e["parent"])} → {escape(e["child"])} {escape(label)}</title></line>')
    for node in graph["nodes"]:
        x, y = pos[node["id"]]
        role = node["role"] if node.get("in_hub", True) else "external"
        stroke = 'stroke="#b45309" stroke-width="2.5"' if role == "self" else 'stroke="#64748b"'
        name = node["id"].split("@")[0]
        sub = f"@{node.get('version') or '?'}  {node.get('kind') or 'not in hub'}"
        box = (f'<g class="node {role}" data-id="{escape(node["id"])}"><rect x="{x:.0f}" y="{y:.0f}" width="{BOX_W}" '
               f'height="{BOX_H}" rx="6" fill="{COLOURS[role]}" {stroke}/>'
               f'<text x="{x + 8:.0f}" y="{y + 19:.0f}" font-size="12" font-family="sans-serif">'
               f'{escape(name[:28])}</text>'
               f'<text x="{x + 8:.0f}" y="{y + 36:.0f}" font-size="11" fill="#334155" '
               f'font-family="sans-serif">{escape(sub[:32])}</text></g>')
        if node.get("in_hub", True) and role != "self":
            box = f'<a href="{escape(link + name + "/" + str(node["version"]))}">{box}</a>'
        out.append(box)
    out.append("</svg>")
    return "\n".join(out)
