"""The built documentation site in a real browser (slow): served locally, opened in headless Chromium.

Home, a guide and an API page load without console errors or failed requests, every internal link on them
resolves (fragments included), and the search box finds ``Modular``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
from html.parser import HTMLParser
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urldefrag, urljoin, urlparse

import httpx
import pytest

from tests.docs_blocks import ROOT
from tests.test_hub_web import _chromium

PAGES = ("index.html", "routing.html", "api/modular.html")


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        pass


class _Ids(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.ids |= {value for name, value in attrs if name in ("id", "name") and value}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    pytest.importorskip("mkdocs", reason="the [docs] extra is not installed")
    site = tmp_path_factory.mktemp("site")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert run.returncode == 0, run.stderr[-4000:]
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(site)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        thread.join(timeout=10)


def _check_links(base: str, page_url: str, hrefs: list[str], seen: dict[str, set[str] | None]) -> list[str]:
    """Internal links of one page that do not resolve: a missing page, or a fragment with no such id there."""
    broken = []
    for href in hrefs:
        target = urljoin(page_url, href)
        if not target.startswith(base) or urlparse(target).scheme not in ("http", "https"):
            continue
        url, fragment = urldefrag(target)
        if url not in seen:
            response = httpx.get(url, timeout=30)
            if response.status_code != 200:
                seen[url] = None
            else:
                ids = _Ids()
                ids.feed(response.text if "html" in response.headers.get("content-type", "") else "")
                seen[url] = ids.ids
        if seen[url] is None:
            broken.append(f"{href} -> {url} (missing)")
        elif fragment and fragment not in seen[url]:
            broken.append(f"{href} -> #{fragment} (no such anchor)")
    return broken


@pytest.mark.slow
def test_site_in_a_browser_pages_links_and_search(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed and could not be installed (apt-get install chromium)")
    problems: list[str] = []
    seen: dict[str, set[str] | None] = {}
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.on("response", lambda r: problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        for path in PAGES:
            url = served + path
            page.goto(url)
            page.wait_for_load_state("networkidle")
            assert page.locator("h1").count() >= 1, f"{path} has a heading"
            assert page.locator("nav.md-nav").count() >= 1, f"{path} shows the navigation"
            hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
            problems += [f"{path}: {b}" for b in _check_links(served, url, hrefs, seen)]
            page.screenshot(path=str(tmp_path / (path.replace("/", "_") + ".png")), full_page=False)
        assert page.locator("#polymod\\.modular\\.Modular").count() == 1, "the API page documents Modular"

        page.goto(served + "index.html")
        page.click("label.md-search__icon, .md-search__input", timeout=10_000)
        page.fill("input.md-search__input", "Modular")
        page.wait_for_selector(".md-search-result__item", timeout=20_000)
        results = page.inner_text(".md-search-result")
        assert "Modular" in results, results[:500]
        first = page.locator(".md-search-result__item a").first.get_attribute("href")
        assert first and _check_links(served, served + "index.html", [first], seen) == []
        browser.close()
    assert not problems, "\n".join(problems)
