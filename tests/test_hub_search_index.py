"""Search and module pages read an index of each module's latest version, a page at a time."""

from __future__ import annotations

import httpx
import pytest

from polymod import hub
from polymod.errors import ConfigError
from polymod.hub import latest, names
from polymod.hub.query import MAX_OFFSET, search, version_page
from tests.hub_helpers import hub_thread, make_package


@pytest.fixture(scope="module")
def pkg(tmp_path_factory):
    return make_package(tmp_path_factory.mktemp("pkg") / "p", description="movie review sentiment",
                        task="sentiment", language="en", tags=["movies"])


def _count(store, sql: str) -> int:
    conn = store.connect()
    try:
        return conn.execute(sql).fetchone()[0]
    finally:
        conn.close()


def test_search_sees_only_the_latest_version_as_it_changes(tmp_path, pkg):
    store = hub.Store(tmp_path / "s")
    for v in ("1.0.0", "2.0.0", "2.1.0-rc.1", "1.5.0"):
        hub.push(pkg, f"alice/senti@{v}", hub=store)
    hits = search(store, "movie").hits
    assert [(h["name"], h["version"]) for h in hits] == [("senti", "2.0.0")], "release beats a newer pre-release"
    assert _count(store, "SELECT COUNT(*) FROM search") == 1, "the full-text index holds one row per module"
    hub.yank("alice/senti@2.0.0", hub=store)
    assert search(store, "movie").hits[0]["version"] == "1.5.0"
    for v in ("1.0.0", "1.5.0", "2.1.0-rc.1"):
        hub.yank(f"alice/senti@{v}", hub=store)
    assert search(store, "movie").total == 0 and search(store).total == 0
    hub.yank("alice/senti@2.1.0-rc.1", hub=store, undo=True)
    assert search(store).hits[0]["version"] == "2.1.0-rc.1", "only a pre-release left: it is the latest"
    assert hub.show("alice/senti", hub=store).version == "2.1.0-rc.1"


def test_search_never_reads_the_version_history(tmp_path, pkg, monkeypatch):
    store = hub.Store(tmp_path / "s")
    for i in range(3):
        for v in ("1.0.0", "1.1.0", "1.2.0"):
            hub.push(pkg, f"alice/m{i}@{v}", hub=store)
    parsed = []
    original = names.SemVer.parse
    monkeypatch.setattr(names.SemVer, "parse", classmethod(lambda cls, t: parsed.append(t) or original(t)))
    result = search(store, "movie", tag="movies")
    assert result.total == 3 and {h["version"] for h in result.hits} == {"1.2.0"}
    assert search(store).total == 3
    assert parsed == [], "search ranked versions itself instead of reading the latest index"


def test_search_pages_are_disjoint_and_cover_every_hit(tmp_path, pkg):
    store = hub.Store(tmp_path / "s")
    for i in range(23):
        hub.push(pkg, f"alice/m{i:02d}@1.0.0", hub=store)
    for query in ("", "movie"):
        seen, offset = [], 0
        while offset is not None:
            page = search(store, query, limit=10, offset=offset)
            assert page.total == 23 and len(page.hits) <= 10
            seen += [h["name"] for h in page.hits]
            offset = page.next_offset
        assert sorted(seen) == [f"m{i:02d}" for i in range(23)], query
    assert search(store, limit=10, offset=20).next_offset is None
    newest_first = [h["name"] for h in search(store, limit=3).hits]
    assert newest_first == ["m22", "m21", "m20"]
    with pytest.raises(ConfigError, match="offset 0..10,000"):
        search(store, offset=MAX_OFFSET + 1)


def test_facet_counts_come_from_the_index(tmp_path, pkg):
    store = hub.Store(tmp_path / "s")
    hub.push(pkg, "alice/a@1.0.0", hub=store)
    hub.push(pkg, "alice/a@1.1.0", hub=store)  # one module: counted once
    other = make_package(tmp_path / "o", description="news topics", task="topic", language="es", tags=["news"])
    hub.push(other, "bob/b@1.0.0", hub=store)
    facets = search(store).facets
    assert facets["task"] == {"sentiment": 1, "topic": 1}
    assert facets["tag"] == {"movies": 1, "news": 1}
    assert search(store, "news").facets["language"] == {"es": 1}
    assert search(store, tag="news").facets["tag"] == {"news": 1}


def test_an_older_store_is_indexed_when_opened(tmp_path, pkg):
    store = hub.Store(tmp_path / "s")
    hub.push(pkg, "alice/a@1.0.0", hub=store)
    hub.push(pkg, "alice/a@2.0.0", hub=store)
    conn = store.connect()  # as a store written before the index existed: no latest rows, one FTS row per version
    conn.execute("DELETE FROM latest")
    conn.execute("DELETE FROM meta WHERE key=?", (latest.BUILT_KEY,))
    conn.execute("INSERT INTO search (rowid, owner, name) SELECT id, owner, name FROM versions WHERE version='1.0.0'")
    conn.close()
    reopened = hub.Store(tmp_path / "s")
    assert [h["version"] for h in search(reopened).hits] == ["2.0.0"]
    assert _count(reopened, "SELECT COUNT(*) FROM search") == 1


def test_version_pages_follow_semver_order(tmp_path, pkg):
    store = hub.Store(tmp_path / "s")
    order = ["2.0.0", "1.0.0", "1.0.0-rc.10", "1.0.0-rc.2", "1.0.0-beta", "0.9.0"]
    for v in ("1.0.0-rc.2", "0.9.0", "1.0.0-rc.10", "2.0.0", "1.0.0-beta", "1.0.0"):
        hub.push(pkg, f"alice/a@{v}", hub=store)
    for size in (1, 2, 4):
        got = []
        for offset in range(0, len(order), size):
            page, total = version_page(store, "alice", "a", offset, size)
            assert total == 6
            got += [v.version for v in page]
        assert got == order, size
    with pytest.raises(ConfigError, match="limit must be 1..100"):
        version_page(store, "alice", "a", 0, 101)
    with pytest.raises(hub.NotFoundError, match="alice/nothing"):
        version_page(store, "alice", "nothing")


def test_api_web_and_client_paginate(tmp_path, pkg):
    store = hub.Store(tmp_path / "s")
    for i in range(25):
        hub.push(pkg, f"alice/m{i:02d}@1.0.0", hub=store)
    for i in range(23):
        hub.push(pkg, f"alice/many@1.{i}.0", hub=store)
    with hub_thread(store) as url:
        body = httpx.get(f"{url}/api/v1/search", params={"q": "movie", "limit": 10, "offset": 20}).json()
        assert (body["total"], len(body["hits"]), body["offset"], body["next_offset"]) == (26, 6, 20, None)
        assert httpx.get(f"{url}/api/v1/search", params={"offset": MAX_OFFSET + 1}).status_code == 422
        r = httpx.get(f"{url}/api/v1/modules/alice/many/versions", params={"limit": 5, "offset": 5})
        assert r.headers["x-total-count"] == "23" and [v["version"] for v in r.json()][0] == "1.17.0"
        assert len(hub.versions("alice/many", hub=url)) == 23, "the client follows the pages"
        page = httpx.get(f"{url}/", params={"q": "movie"}).text
        assert "1–20 of 26" in page and 'rel="next" href="?q=movie&amp;offset=20"' in page
        assert "21–26 of 26" in httpx.get(f"{url}/", params={"q": "movie", "offset": 20}).text
        module = httpx.get(f"{url}/m/alice/many").text
        assert "versions 1–20 of 23" in module and "?versions=20" in module and module.count("↓</small>") == 20
        older = httpx.get(f"{url}/m/alice/many", params={"versions": 20}).text
        assert "versions 21–23 of 23" in older and ">\n1.0.0</a>" in older


def test_past_the_window_every_hit_is_still_listed_once(tmp_path, pkg, monkeypatch):
    from polymod.hub import query

    store = hub.Store(tmp_path / "s")
    for i in range(12):
        hub.push(pkg, f"alice/m{i:02d}@1.0.0", hub=store)
    hub.push(make_package(tmp_path / "n", description="other words"), "alice/movie-tagger@1.0.0", hub=store)
    monkeypatch.setattr(query, "WINDOW", 5)
    for q, facets in (("movie", {}), ("", {"task": "sentiment"}), ("movie", {"tag": "movies"})):
        seen, offset = [], 0
        while offset is not None:
            page = search(store, q, limit=3, offset=offset, **facets)
            seen += [h["name"] for h in page.hits]
            offset = page.next_offset
        assert len(seen) == len(set(seen)) == page.total, (q, facets)
        assert page.facet_hits == 5, "facets counted over the window"
    assert search(store, "movie").total == 13
    assert search(store, "movie", limit=1).hits[0]["name"] == "movie-tagger", "a name match ranks first"
    assert search(store).facet_hits == 13 and search(store).facets["task"] == {"sentiment": 12}


def test_unfiltered_facet_counts_follow_yanks(tmp_path, pkg):
    store = hub.Store(tmp_path / "s")
    hub.push(pkg, "alice/a@1.0.0", hub=store)
    other = make_package(tmp_path / "o", description="news", task="topic", tags=["news"])
    hub.push(other, "alice/a@2.0.0", hub=store)
    assert search(store).facets["task"] == {"topic": 1} and search(store).facets["tag"] == {"news": 1}
    hub.yank("alice/a@2.0.0", hub=store)
    assert search(store).facets["task"] == {"sentiment": 1} and search(store).facets["tag"] == {"movies": 1}
    hub.yank("alice/a@1.0.0", hub=store)
    assert search(store).facets == {f: {} for f in ("kind", "architecture", "task", "language", "tag")}


def test_a_text_query_with_a_facet_is_driven_by_the_full_text_index(tmp_path, pkg):
    store = hub.Store(tmp_path / "s")
    for i in range(30):
        hub.push(pkg, f"alice/m{i:02d}@1.0.0", hub=store)
    source, where, args, order = store.db.text_search(["movie"])
    conn = store.connect()
    try:
        plans = [[r[3] for r in conn.execute(f"EXPLAIN QUERY PLAN {sql}", [*args, "sentiment"])] for sql in (
            f"SELECT l.version_id FROM {source} WHERE {where} AND l.task = ? ORDER BY {order} LIMIT 300",
            f"SELECT COUNT(*) FROM {source} WHERE {where} AND l.task = ?")]
    finally:
        conn.close()
    for plan in plans:
        assert plan[0].startswith("SCAN search VIRTUAL TABLE"), plan  # else MATCH re-runs once per facet row
    assert not any("TEMP B-TREE" in step for step in plans[0]), plans[0]  # newest first, no sort of every match
