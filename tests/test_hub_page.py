"""The module page as a user wants it: rendered README (no script possible), a usage snippet, base model,
dates, human sizes, and no empty sections."""

from __future__ import annotations

from html.parser import HTMLParser

import httpx
import pytest

from polymod import hub
from polymod.hub.render import human_size, render_readme
from tests.hub_helpers import hub_thread, make_package

XSS = """# Sentiment LoRA

Trained on **movie reviews**. See [the paper](https://arxiv.org/abs/2302.11529).

<script>alert("readme")</script>
<img src=x onerror="alert(2)">
[click](javascript:alert(3))
<a href="https://ok.example" onclick="alert(4)">raw link</a>

| metric | value |
|---|---|
| accuracy | 0.79 |
"""


class _Elements(HTMLParser):
    """Every element and attribute a browser would build from the HTML."""

    def __init__(self, html: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {k: v or "" for k, v in attrs}))


def _assert_inert(html: str) -> None:
    for tag, attrs in _Elements(html).tags:
        assert tag not in ("script", "iframe", "svg", "object", "embed", "style"), tag
        assert not [k for k in attrs if k.startswith("on") or k == "style"], (tag, attrs)
        for k in ("href", "src"):
            assert not attrs.get(k, "").strip().lower().startswith(("javascript:", "data:", "vbscript:")), attrs


@pytest.mark.parametrize("attack", ['<script>alert(1)</script>', '<img src=x onerror=alert(1)>',
                                    '[x](javascript:alert(1))', '<svg onload=alert(1)>', '<iframe src="//e">',
                                    '[x](JaVaScRiPt:alert(1))', '![x](data:text/html,<script>alert(1)</script>)'])
def test_render_readme_never_emits_active_content(attack):
    _assert_inert(render_readme(attack))


def test_human_size():
    assert [human_size(n) for n in (0, 999, 1000, 1536, 2_300_000, 5 * 10**12)] == [
        "0 B", "999 B", "1.0 kB", "1.5 kB", "2.3 MB", "5.0 TB"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("page")
    store = hub.Store(tmp / "store")
    pkg = make_package(tmp / "a", seed=1, description="movie sentiment", task="sentiment")
    (pkg / "README.md").write_text(XSS)
    hub.push(pkg, "alice/senti@1.0.0", hub=store)
    hub.push(make_package(tmp / "b", seed=2), "bob/bare@0.1.0", hub=store)
    with hub_thread(store) as url:
        yield url, httpx.get(f"{url}/m/alice/senti").text, httpx.get(f"{url}/m/bob/bare").text


def test_readme_is_rendered_and_sanitised(page):
    url, html, _ = page
    readme = html.split('id="readme">', 1)[1].split("</div>", 1)[0]
    assert "<h1>Sentiment LoRA</h1>" in readme and "<strong>movie reviews</strong>" in readme
    assert '<a href="https://arxiv.org/abs/2302.11529" rel="nofollow noopener noreferrer">' in readme
    assert "<table>" in readme and "<td>0.79</td>" in readme
    _assert_inert(html.split("</style>", 1)[1])  # the whole page body: the lineage SVG is the only svg


def test_page_has_snippet_byline_and_human_sizes(page):
    url, html, _ = page
    assert f'pm.hub.get("alice/senti@1.0.0", host=host, hub="{url}")' in html
    assert f"polymod hub pull alice/senti@1.0.0 --hub {url}" in html
    assert 'id="byline">published 20' in html and " UTC" in html
    assert " kB</td>" in html and "bytes" in html


def test_empty_sections_are_hidden(page):
    _, _, bare = page
    assert 'id="metrics"' not in bare and 'id="readme"' not in bare and 'id="lineage"' not in bare
    assert "<th>task</th>" not in bare and "<th>tags</th>" not in bare and 'id="description"' not in bare


@pytest.mark.slow
@pytest.mark.parametrize("width", [390, 1280])
def test_browser_layout_and_readme_xss(page, tmp_path, width):
    """Headless Chromium at a phone's and a laptop's width: no script from the README runs, nothing overflows
    the viewport sideways, and the facet column never overlaps the results. Screenshots go to tmp_path."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from tests.test_hub_web import _chromium

    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed and could not be installed (apt-get install chromium)")
    url = page[0]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": width, "height": 900})
        dialogs: list[str] = []
        tab.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        tab.goto(f"{url}/m/alice/senti")
        tab.wait_for_selector("#readme h1")
        assert tab.inner_text("#readme h1") == "Sentiment LoRA"
        assert tab.evaluate("document.documentElement.scrollWidth") <= width, "the page scrolls sideways"
        tab.screenshot(path=str(tmp_path / f"module-{width}.png"), full_page=True)
        tab.goto(f"{url}/?q=")
        tab.wait_for_selector("#total")
        results, facets = tab.locator(".results").bounding_box(), tab.locator(".facets").bounding_box()
        overlap_x = min(results["x"] + results["width"], facets["x"] + facets["width"]) - max(results["x"], facets["x"])
        overlap_y = min(results["y"] + results["height"], facets["y"] + facets["height"]) - max(results["y"],
                                                                                                facets["y"])
        assert overlap_x <= 0 or overlap_y <= 0, (results, facets)
        assert tab.evaluate("document.documentElement.scrollWidth") <= width
        tab.screenshot(path=str(tmp_path / f"search-{width}.png"), full_page=True)
        browser.close()
    assert dialogs == [], f"a script ran: {dialogs}"
    assert (tmp_path / f"module-{width}.png").stat().st_size > 1000
