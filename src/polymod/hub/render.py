"""Text for the hub's web pages: a package's README as sanitised HTML, sizes and dates for people.

The README is untrusted Markdown. It is rendered by ``markdown-it-py`` (CommonMark, raw HTML
disabled, so ``<script>`` stays text) and the HTML is then cleaned by ``nh3`` (the Rust
``ammonia`` sanitiser) to an allow-list of tags and attributes: no script, no event handlers,
no ``javascript:`` links, no styles. Either layer alone would stop a script; both are kept.
"""

from __future__ import annotations

import datetime as dt

import nh3
from markdown_it import MarkdownIt

_MD = MarkdownIt("commonmark", {"html": False, "linkify": False}).enable("table")
_TAGS = {"a", "abbr", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr", "i",
         "img", "li", "ol", "p", "pre", "strong", "sub", "sup", "table", "tbody", "td", "th", "thead", "tr", "ul"}
_ATTRIBUTES = {"a": {"href", "title"}, "img": {"src", "alt", "title"}, "td": {"align"}, "th": {"align"}}


def render_readme(text: str) -> str:
    """``text`` (Markdown) as HTML safe to embed in a page: allow-listed tags only, links ``rel="nofollow"``."""
    html = _MD.render(text)
    return nh3.clean(html, tags=_TAGS, attributes=_ATTRIBUTES, url_schemes={"http", "https", "mailto"},
                     link_rel="nofollow noopener noreferrer")


def human_size(n: int) -> str:
    """A byte count for people: ``512 B``, ``1.5 kB``, ``2.3 MB`` (powers of 1000, as file managers show)."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def human_date(timestamp: float) -> str:
    """A UNIX time as a UTC date and minute, e.g. ``2026-12-03 08:15 UTC``."""
    return dt.datetime.fromtimestamp(timestamp, dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


__all__ = ["human_date", "human_size", "render_readme"]
