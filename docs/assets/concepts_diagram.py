"""Draws docs/assets/concepts.svg, the picture on the Concepts page: host, site, modules, router, aggregator, hub.

Run ``python docs/assets/concepts_diagram.py`` after changing it; ``tests/test_docs.py`` checks that the checked-in
SVG is what this file draws. Plain SVG, no dependencies, no fonts to download.
"""

from __future__ import annotations

from html import escape
from pathlib import Path

WIDTH, HEIGHT = 860, 470
# name: (x, y, width, height, title, subtitle, style)
BOXES = {
    "host": (20, 20, 600, 110, "host  (frozen θ: any pretrained torch.nn.Module)", "", "host"),
    "embed": (40, 62, 120, 52, "embed", "input site", "layer"),
    "q": (180, 62, 120, 52, "attn.q", "site", "site"),
    "ffn": (320, 62, 120, 52, "ffn.out", "site", "layer"),
    "head": (460, 62, 140, 52, "classifier", "f_θ(x)", "layer"),
    "router": (30, 190, 170, 56, "router r(x)", "weights per task · row · token", "router"),
    "m1": (230, 170, 150, 40, "module φ₁  LoRA", "", "module"),
    "m2": (230, 220, 150, 40, "module φ₂  adapter", "", "module"),
    "m3": (230, 270, 150, 40, "module φ₃  IA³", "", "module"),
    "agg": (430, 200, 170, 56, "aggregator g", "sum · attention · merge", "aggregator"),
    "hub": (650, 280, 190, 64, "hub", "cards · lineage · versions", "hub"),
    "train": (30, 340, 590, 110, "", "", "training"),
}
# (from, to, label[, both ways]): drawn as straight arrows between box edges
ARROWS = [
    ("q", "router", "x"),
    ("router", "m1", ""), ("router", "m2", ""), ("router", "m3", ""),
    ("m1", "agg", ""), ("m2", "agg", ""), ("m3", "agg", ""),
    ("agg", "q", "+ g(…)"),
    ("m3", "hub", "push · pull", True),
]
NOTES = [
    (40, 368, "training: gradients reach the modules φ and the router r only; the host θ stays bit-identical"),
    (40, 392, "composition (data):  Mix([\"φ₁\", \"φ₂\", \"φ₃\"], router=TopK(k=2))  ·  Stack(\"en\", \"task\")"
              "  ·  Parallel(\"a\", \"b\")"),
    (40, 416, "at each site:  f′(x) = f_θ(x) + g( r(x), f_φ₁(x), …, f_φₙ(x) )"),
    (40, 440, "vocabulary: host · site · module · router · aggregator · composition · card · lineage"),
]
STYLE = {
    "host": ("#eef2f7", "#5b6b82", "6 3"),
    "layer": ("#ffffff", "#5b6b82", ""),
    "site": ("#fff4d6", "#c28a00", ""),
    "router": ("#e6f4ea", "#2e7d32", ""),
    "module": ("#e8eefc", "#3557b7", ""),
    "aggregator": ("#fbe9e7", "#b5482a", ""),
    "hub": ("#f3e8fb", "#7b3fa0", ""),
    "training": ("none", "#888888", "4 4"),
}


def _centre(name: str) -> tuple[float, float]:
    x, y, w, h, *_ = BOXES[name]
    return x + w / 2, y + h / 2


def _edge(name: str, towards: tuple[float, float]) -> tuple[float, float]:
    """Where the line from the box's centre towards a point leaves the box."""
    x, y, w, h, *_ = BOXES[name]
    cx, cy = _centre(name)
    dx, dy = towards[0] - cx, towards[1] - cy
    if dx == 0 and dy == 0:
        return cx, cy
    scale = min(w / 2 / abs(dx) if dx else float("inf"), h / 2 / abs(dy) if dy else float("inf"))
    return cx + dx * scale, cy + dy * scale


def _box(name: str) -> str:
    x, y, w, h, title, subtitle, style = BOXES[name]
    fill, stroke, dash = STYLE[style]
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    parts = [f'<g class="{style}" id="{name}">',
             f'<rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" fill="{fill}" stroke="{stroke}"{dashed}/>']
    if style == "host":
        parts.append(f'<text x="{x + 10}" y="{y + 18}" class="title">{escape(title)}</text>')
    elif title:
        ty = y + h / 2 + (4 if not subtitle else -3)
        parts.append(f'<text x="{x + w / 2}" y="{ty}" class="title" text-anchor="middle">{escape(title)}</text>')
        if subtitle:
            parts.append(f'<text x="{x + w / 2}" y="{ty + 16}" class="sub" text-anchor="middle">'
                         f"{escape(subtitle)}</text>")
    parts.append("</g>")
    return "".join(parts)


def _arrow(a: str, b: str, label: str, both: bool = False) -> str:
    x1, y1 = _edge(a, _centre(b))
    x2, y2 = _edge(b, _centre(a))
    line = (f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="#444" '
            f'stroke-width="1.4" marker-end="url(#arrow)"' + (' marker-start="url(#arrow)"' if both else "") + "/>")
    if not label:
        return line
    mx, my = (x1 + x2) / 2, (y1 + y2) / 2
    return line + f'<text x="{mx + 6:.1f}" y="{my - 4:.1f}" class="label">{escape(label)}</text>'


def draw() -> str:
    """The diagram as an SVG document (a string, deterministic)."""
    head = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
            f'height="{HEIGHT}" role="img" aria-label="polymod concepts: host, site, modules, router, aggregator, hub">'
            '<title>polymod: a frozen host, a site, modules, a router, an aggregator and the hub</title>'
            "<defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"7\" "
            "markerHeight=\"7\" orient=\"auto-start-reverse\"><path d=\"M 0 0 L 10 5 L 0 10 z\" fill=\"#444\"/>"
            "</marker></defs>"
            "<style>text{font-family:sans-serif;font-size:13px;fill:#222}.title{font-weight:600}"
            ".sub{font-size:11px;fill:#555}.label{font-size:11px;fill:#333;font-style:italic}"
            ".note{font-size:12px}</style>")
    body = [_box(n) for n in BOXES]
    body += [_arrow(*arrow) for arrow in ARROWS]
    body += [f'<text x="{x}" y="{y}" class="note">{escape(text)}</text>' for x, y, text in NOTES]
    return head + "".join(body) + "</svg>\n"


if __name__ == "__main__":
    out = Path(__file__).with_name("concepts.svg")
    out.write_text(draw(), encoding="utf-8")
    print(f"wrote {out}")
