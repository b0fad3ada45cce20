"""The hub's web pages: search, module pages and owner pages, rendered on the server.

Plain HTML (Jinja2 with autoescaping) over the same store functions as the
API; no JavaScript is needed, so every page also works in a text browser.

* ``/`` — a search box, facet filters with counts, and the hits;
* ``/m/{owner}/{name}[/{version}]`` — the module page: card fields, description,
  metrics, files with sha256, versions, the lineage graph drawn as an SVG picture
  and the raw card;
* ``/u/{owner}`` — an owner's modules.
"""


import json
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlencode

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from jinja2 import DictLoader, Environment, select_autoescape

from polymod.card import Lineage, Parent
from polymod.errors import HubError
from polymod.hub.ancestry import lineage
from polymod.hub.package import MAX_README_BYTES, README_FILE
from polymod.hub.query import FACETS, MAX_OFFSET, downloads_of, owner_modules, search, version_page
from polymod.hub.render import human_date, human_size, render_readme
from polymod.hub.store import Store
from polymod.hub.svg import lineage_svg

_BASE = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}{% endblock %} · polymod hub</title>
<style>
body{font-family:system-ui,sans-serif;margin:0;color:#1e293b}header{background:#1e293b;color:#fff;padding:.7em 1.5em}
header a{color:#fff;text-decoration:none;font-weight:600}main{padding:1em 1.5em;max-width:1100px}
.hit{border-bottom:1px solid #e2e8f0;padding:.6em 0}.hit h3{margin:.1em 0}.meta{color:#475569;font-size:.9em}
.tag{background:#e0e7ff;border-radius:3px;padding:0 .4em;margin-right:.3em;font-size:.85em}
.layout{display:flex;flex-wrap:wrap-reverse;gap:1.5em}.results{flex:1 1 420px;min-width:0}
.facets{flex:0 0 200px;font-size:.9em}.facets h4{margin:.6em 0 .2em}table{border-collapse:collapse}
.scroll{overflow-x:auto;max-width:100%}code{overflow-wrap:anywhere}.readme{border-top:1px solid #e2e8f0}
.byline{color:#475569}
td,th{border:1px solid #e2e8f0;padding:.25em .6em;text-align:left;font-size:.92em}code{font-size:.85em}
.yanked{color:#b91c1c;font-weight:600}pre{background:#f8fafc;padding:.6em;overflow:auto;max-height:300px}
</style></head><body><header><a href="/">polymod hub</a></header>
<main>{% block body %}{% endblock %}</main></body></html>"""

_SEARCH = """{% extends "base" %}{% block title %}search{% endblock %}{% block body %}
<form action="/" method="get" role="search"><input type="search" name="q" value="{{ q }}" size="40"
 placeholder="search modules" aria-label="search"> <button type="submit">Search</button>
{% for k, v in active.items() %}<input type="hidden" name="{{ k }}" value="{{ v }}">{% endfor %}</form>
<div class="layout"><div class="results">
<p id="total">{{ result.total }} module{{ "" if result.total == 1 else "s" }}{% if q %} for “{{ q }}”{% endif %}
{% for k, v in active.items() %} · {{ k }}={{ v }}{% endfor %}</p>
{% for h in result.hits %}<div class="hit"><h3><a href="/m/{{ h.owner }}/{{ h.name }}">{{ h.owner }}/{{ h.name }}</a>
<small>{{ h.version }}</small></h3><div>{{ h.description or "" }}</div><div class="meta">{{ h.kind }}
{% if h.architecture %}· {{ h.architecture }}{% endif %}{% if h.task %} · task {{ h.task }}{% endif %}
{% if h.language %} · {{ h.language }}{% endif %} · by <a href="/u/{{ h.owner }}">{{ h.owner }}</a>
{% if h.downloads %} · {{ h.downloads }} download{{ "" if h.downloads == 1 else "s" }}{% endif %}
{% for t in h.tags %}<span class="tag">{{ t }}</span>{% endfor %}</div></div>{% endfor %}
{% if result.offset > 0 or result.next_offset is not none %}<p class="pages" id="pages">{{ result.offset + 1 }}–{{
 result.offset + result.hits|length }} of {{ result.total }}
{% if result.offset > 0 %}<a rel="prev" href="?{{ page(result.offset - result.limit) }}">previous</a>{% endif %}
{% if result.next_offset is not none %}<a rel="next" href="?{{ page(result.next_offset) }}">next</a>{% endif %}
</p>{% endif %}</div>
<div class="facets">{% for facet, counts in result.facets.items() %}{% if counts %}<h4>{{ facet }}</h4>
{% for value, n in counts.items() %}
<div><a class="facet" href="?{{ link(facet, value) }}">{{ value }}</a> ({{ n }})</div>
{% endfor %}{% endif %}{% endfor %}</div></div>{% endblock %}"""

_MODULE = """{% extends "base" %}{% block title %}{{ v.owner }}/{{ v.name }}{% endblock %}{% block body %}
<h1><a href="/u/{{ v.owner }}">{{ v.owner }}</a>/{{ v.name }} <small id="version">{{ v.version }}</small></h1>
{% if v.yanked %}<p class="yanked">This version is yanked: {{ v.yank_reason or "no reason given" }}</p>{% endif %}
<p class="byline" id="byline">published {{ date }}{% if v.uploader %} by {{ v.uploader }}{% endif %} ·
 {{ size(v.size) }} · <span id="downloads">{{ v.downloads }} download{{ "" if v.downloads == 1 else "s" }}</span></p>
{% if card.description %}<p id="description">{{ card.description }}</p>{% endif %}
<h2>Use it</h2><pre id="snippet">import polymod as pm

module = pm.hub.get("{{ v.owner }}/{{ v.name }}@{{ v.version }}", host=host, hub="{{ hub_url }}")</pre>
<pre id="cli">polymod hub pull {{ v.owner }}/{{ v.name }}@{{ v.version }} --hub {{ hub_url }}</pre>
<h2>Card</h2><div class="scroll"><table id="card"><tr><th>kind</th><td>{{ v.kind }}</td></tr>
{% if base_model %}<tr><th>base model</th><td id="base-model">{{ base_model.name }}{% if base_model.weights_sha256 %}
 <code>weights {{ base_model.weights_sha256[:12] }}</code>{% endif %}</td></tr>{% endif %}
{% if card.host.architecture %}<tr><th>host</th><td>{{ card.host.architecture }}{% if card.host.model_type %}
 ({{ card.host.model_type }}){% endif %}</td></tr>{% endif %}
{% if card.sites %}<tr><th>sites</th><td>{{ card.sites|length }}</td></tr>{% endif %}
{% for key in ("task", "language", "license") if card[key] %}<tr><th>{{ key }}</th><td>{{ card[key] }}</td></tr>
{% endfor %}{% if card.tags %}<tr><th>tags</th><td>{% for t in card.tags %}<span class="tag">{{ t }}</span>
{% endfor %}</td></tr>{% endif %}{% if recipe %}<tr><th>lineage</th><td>{{ recipe }}</td></tr>{% endif %}
<tr><th>sha256</th><td><code>{{ v.sha256 }}</code></td></tr></table></div>
{% if card.metrics %}<h2>Metrics</h2><div class="scroll"><table id="metrics"><tr><th>metric</th><th>value</th>
<th>details</th></tr>{% for k, m in card.metrics.items() %}<tr><td>{{ k }}</td><td>{{ m.value if m is mapping else m }}
</td><td>{% if m is mapping %}{% for dk, dv in m.items() if dk != "value" %}{{ dk }}: {{ dv }} {% endfor %}{% endif %}
</td></tr>{% endfor %}</table></div>{% endif %}
{% if readme %}<h2>README</h2><div class="readme" id="readme">{{ readme|safe }}</div>{% endif %}
<h2>Files</h2><div class="scroll"><table id="files"><tr><th>file</th><th>size</th><th>sha256</th></tr>
{% for path, f in v.files.items() %}<tr><td><a href="/api/v1/blobs/{{ f.sha256 }}">{{ path }}</a></td>
<td title="{{ f.size }} bytes">{{ size(f.size) }}</td><td><code>{{ f.sha256 }}</code></td></tr>{% endfor %}
</table></div>
{% if show_lineage %}<h2>Lineage</h2><div id="lineage" class="scroll">{{ svg|safe }}</div>{% endif %}
{% if children.total > children.limit %}<p class="pages">descendants {{ children.offset + 1 }}–{{
 [children.offset + children.limit, children.total]|min }} of {{ children.total }}
{% if children.offset > 0 %}<a href="?descendants={{ [children.offset - children.limit, 0]|max
 }}">previous</a>{% endif %}
{% if children.offset + children.limit < children.total %}<a href="?descendants={{ children.offset + children.limit
 }}">next</a>{% endif %}</p>{% endif %}
<h2>Versions</h2><ul id="versions">{% for o in versions %}<li><a href="/m/{{ o.owner }}/{{ o.name }}/{{ o.version }}">
{{ o.version }}</a> <small>{{ o.downloads }} ↓</small>{% if o.yanked %} <span class="yanked">yanked</span>{% endif %}
</li>{% endfor %}</ul>
{% if version_total > versions|length %}<p class="pages" id="version-pages">versions {{ version_offset + 1 }}–{{
 version_offset + versions|length }} of {{ version_total }}
{% if version_offset > 0 %}<a href="?versions={{ [version_offset - version_limit, 0]|max }}">newer</a>{% endif %}
{% if version_offset + versions|length < version_total %}<a href="?versions={{ version_offset + version_limit
 }}">older</a>{% endif %}</p>{% endif %}
<h2>Raw card</h2><pre>{{ raw }}</pre>{% endblock %}"""

_OWNER = """{% extends "base" %}{% block title %}{{ owner }}{% endblock %}{% block body %}
<h1 id="owner">{{ owner }}</h1>
<p>{{ modules|length }} module{{ "" if modules|length == 1 else "s" }}</p>{% for m in modules %}<div class="hit">
<h3><a href="/m/{{ m.owner }}/{{ m.name }}">{{ m.name }}</a> <small>{{ m.version }}</small></h3>
<div class="meta">{{ m.kind }} · {{ m.versions }} version{{ "" if m.versions == 1 else "s" }}
{% if m.all_yanked %}<span class="yanked">all yanked</span>{% endif %}</div></div>{% endfor %}{% endblock %}"""

_ERROR = """{% extends "base" %}{% block title %}not found{% endblock %}{% block body %}<h1>Not found</h1>
<p id="error">{{ message }}</p>{% endblock %}"""

PAGE = 20  # hits per search page, versions per module page

_ENV = Environment(loader=DictLoader({"base": _BASE, "search": _SEARCH, "module": _MODULE, "owner": _OWNER,
                                      "error": _ERROR}), autoescape=select_autoescape(default=True))


def _page(template: str, status: int = 200, **values: Any) -> HTMLResponse:
    return HTMLResponse(_ENV.get_template(template).render(**values), status_code=status)


def add_routes(app: FastAPI, store: Store, api_error: Callable[[Request, HubError], Awaitable[Response]],
               downloads: Any = None) -> None:
    """Add the web pages to ``app``; hub errors on pages become an error page, on ``/api/`` ``api_error``'s answer.

    ``downloads`` (the server's :class:`~polymod.hub.server.DownloadCounter`) is flushed before a module page
    shows its counts.
    """

    @app.exception_handler(HubError)
    async def hub_error(request: Request, exc: HubError):
        if request.url.path.startswith("/api/"):
            return await api_error(request, exc)
        return _page("error", status=exc.status, message=str(exc))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home(request: Request, q: str = "", offset: int = 0) -> HTMLResponse:
        active = {f: request.query_params[f] for f in FACETS if request.query_params.get(f)}
        result = search(store, q[:256], limit=PAGE, offset=max(0, min(offset, MAX_OFFSET)), **active)

        def link(facet: str, value: str) -> str:
            return urlencode({"q": q, **active, facet: value})

        def page(start: int) -> str:
            return urlencode({"q": q, **active, "offset": max(0, start)})

        return _page("search", q=q, active=active, result=result, link=link, page=page)

    @app.get("/m/{owner}/{name}", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/m/{owner}/{name}/{version}", response_class=HTMLResponse, include_in_schema=False)
    def module_page(request: Request, owner: str, name: str, version: str = "latest",
                    descendants: int = 0, versions: int = 0) -> HTMLResponse:
        if downloads is not None:
            downloads.flush()
        info = store.get(owner, name, version)
        info.downloads = downloads_of(store, info)
        listed, total = version_page(store, owner, name, max(0, min(versions, 1_000_000)), PAGE)
        card = info.card
        lin = card.get("lineage", {})
        recipe = Lineage([Parent(**p) for p in lin.get("parents", [])], lin.get("recipe", {})).describe()
        graph = lineage(store, owner, name, info.version, depth=4, offset=max(0, min(descendants, 1_000_000)))
        readme = None
        if README_FILE in info.files and info.files[README_FILE]["size"] <= MAX_README_BYTES:
            with store.open_blob(info.files[README_FILE]["sha256"]) as f:
                readme = render_readme(f.read(MAX_README_BYTES).decode("utf-8", errors="replace"))
        return _page("module", v=info, card=card, recipe=recipe if lin.get("parents") or lin.get("recipe") else "",
                     svg=lineage_svg(graph), children=graph["children"], versions=listed,
                     raw=json.dumps(card, indent=2, sort_keys=True), readme=readme, size=human_size,
                     date=human_date(info.created), hub_url=str(request.base_url).rstrip("/"),
                     base_model=(card.get("host") or {}).get("base_model"), show_lineage=len(graph["nodes"]) > 1,
                     version_total=total, version_offset=max(0, versions), version_limit=PAGE)

    @app.get("/u/{owner}", response_class=HTMLResponse, include_in_schema=False)
    def owner_page(owner: str) -> HTMLResponse:
        return _page("owner", owner=owner, modules=owner_modules(store, owner))
