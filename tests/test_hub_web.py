"""The hub's web pages: HTML checks (fast) and a real headless Chromium driven by Playwright (slow)."""

from __future__ import annotations

import os
import shutil
import subprocess

import httpx
import pytest

from polymod import hub
from polymod.card import Lineage, Parent
from tests.hub_helpers import hub_thread, make_package


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("web")
    store = hub.Store(tmp / "store")
    a = hub.push(make_package(tmp / "a", seed=1, description="movie review sentiment", task="sentiment",
                              language="en", tags=["movies"], license="apache-2.0",
                              metrics={"accuracy": {"value": 0.79, "dataset": "rotten_tomatoes", "split": "test"}}),
                 "alice/senti@1.0.0", hub=store)
    b = hub.push(make_package(tmp / "b", seed=2, description="news topics <script>alert(1)</script>",
                              task="topic", language="es"), "bob/topics@0.2.0", hub=store)
    merged = Lineage([Parent("alice/senti", "1.0.0", a.sha256, 0.5), Parent("bob/topics", "0.2.0", b.sha256, 0.5)],
                     {"method": "ties", "density": 0.2})
    hub.push(make_package(tmp / "m", seed=3, description="a merge", lineage=merged), "alice/merged@1.0.0", hub=store)
    with hub_thread(store) as url:
        yield url


def test_search_page_lists_hits_and_facets(site):
    page = httpx.get(f"{site}/", params={"q": "movie"}).text
    assert 'href="/m/alice/senti"' in page and "bob/topics" not in page and 'id="total">1 module' in page
    everything = httpx.get(f"{site}/").text
    assert "3 modules" in everything and 'class="facet"' in everything and "sentiment</a> (1)" in everything
    filtered = httpx.get(f"{site}/", params={"language": "es"}).text
    assert "bob/topics" in filtered and "alice/senti" not in filtered


def test_module_page_shows_card_files_metrics_and_lineage_picture(site):
    page = httpx.get(f"{site}/m/alice/merged").text
    assert 'id="version">1.0.0' in page and "ties(density=0.2) of alice/senti@1.0.0, bob/topics@0.2.0" in page
    assert page.count('<g class="node') == 3 and page.count('class="edge"') == 2 and "<svg" in page
    assert 'href="/m/alice/senti/1.0.0"' in page, "lineage nodes link to their pages"
    senti = httpx.get(f"{site}/m/alice/senti/1.0.0").text
    assert "rotten_tomatoes" in senti and "0.79" in senti and "weights.safetensors" in senti
    assert '<g class="node descendant"' in senti


def test_owner_page_error_page_and_escaping(site):
    owner = httpx.get(f"{site}/u/alice").text
    assert "2 modules" in owner and "merged" in owner and "senti" in owner
    missing = httpx.get(f"{site}/m/alice/nope")
    assert missing.status_code == 404 and "is not in the hub" in missing.text
    topics = httpx.get(f"{site}/m/bob/topics").text
    assert "<script>alert(1)</script>" not in topics and "&lt;script&gt;" in topics


def _chromium() -> str | None:
    """Debian's chromium; installed with apt-get by this set-up when missing and running as root."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, timeout=1200,
                       capture_output=True)
        found = shutil.which("chromium")
    return found


@pytest.mark.slow
def test_browser_search_module_and_owner_pages(site, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is not installed and could not be installed (apt-get install chromium)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.goto(site + "/")
        page.fill("input[name=q]", "movie")
        page.click("button[type=submit]")
        page.wait_for_selector("#total")
        assert page.inner_text("#total").startswith("1 module")
        page.click("text=alice/senti")
        page.wait_for_selector("#lineage svg")
        assert page.inner_text("#version") == "1.0.0"
        assert "rotten_tomatoes" in page.inner_text("#metrics")
        assert page.locator("#lineage svg g.node").count() == 2
        box = page.locator("#lineage svg").bounding_box()
        assert box is not None and box["width"] > 100 and box["height"] > 40, "the graph is drawn"
        page.screenshot(path=str(tmp_path / "module.png"), full_page=True)
        page.click("#lineage svg a")
        page.wait_for_selector("#version")
        assert "alice/merged" in page.title()
        page.click("header a")
        page.click("text=sentiment")  # a facet link
        assert page.inner_text("#total").startswith("1 module")
        page.goto(site + "/u/bob")
        assert page.inner_text("#owner") == "bob"
        browser.close()
