"""The guarantees both metadata backends give: serialised concurrent publishers, atomic publish, same search."""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading

import pytest

from polymod import hub
from polymod.errors import BusyError
from polymod.hub import auth, latest
from tests.hub_helpers import make_package

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL


def _race(jobs):
    """Run the callables at the same moment on their own threads; returns each one's result or exception."""
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait()
        try:
            return job()
        except Exception as exc:  # noqa: BLE001 - the outcome is what the test looks at
            return exc

    with cf.ThreadPoolExecutor(len(jobs)) as pool:
        return list(pool.map(run, jobs))


def test_concurrent_publishers_of_one_version_exactly_one_wins(tmp_path):
    store = hub.Store(tmp_path / "store")
    packages = [make_package(tmp_path / f"p{i}", seed=i) for i in range(6)]
    outcomes = _race([lambda p=p: hub.push(p, "alice/m@1.0.0", hub=hub.Store(store.root)) for p in packages])
    won = [o for o in outcomes if isinstance(o, hub.VersionInfo)]
    lost = [o for o in outcomes if not isinstance(o, hub.VersionInfo)]
    assert len(won) == 1, outcomes
    assert all(isinstance(o, hub.ConflictError) and "immutable" in str(o) for o in lost), lost
    assert [v.sha256 for v in hub.versions("alice/m", hub=store)] == [won[0].sha256]
    assert store.check() == []


def test_concurrent_case_variants_leave_one_name(tmp_path):
    store = hub.Store(tmp_path / "store")
    spellings = ["senti", "Senti", "SENTI", "sEnti"]
    packages = [make_package(tmp_path / s, seed=i) for i, s in enumerate(spellings)]
    outcomes = _race([lambda p=p, s=s: hub.push(p, f"alice/{s}@1.0.0", hub=hub.Store(store.root))
                      for p, s in zip(packages, spellings)])
    assert sum(isinstance(o, hub.VersionInfo) for o in outcomes) == 1, outcomes
    assert all("differs from it only by case" in str(o) for o in outcomes if not isinstance(o, hub.VersionInfo))
    assert hub.search("senti", hub=store).total == 1


def test_concurrent_publishers_of_different_versions_all_land(tmp_path):
    store = hub.Store(tmp_path / "store")
    pkg = make_package(tmp_path / "p")
    refs = [f"alice/m{i % 3}@1.{i}.0" for i in range(9)]
    outcomes = _race([lambda r=r: hub.push(pkg, r, hub=hub.Store(store.root)).ref for r in refs])
    assert sorted(outcomes) == sorted(refs)
    assert hub.search("", hub=store).total == 3
    assert [hub.show(f"alice/m{i}", hub=store).version for i in range(3)] == ["1.6.0", "1.7.0", "1.8.0"]


def test_a_publish_that_fails_midway_leaves_nothing(tmp_path, monkeypatch):
    store = hub.Store(tmp_path / "store")
    pkg = make_package(tmp_path / "p", description="half published")

    def fail(*args, **kwargs):
        raise RuntimeError("crash after the version row was written")

    monkeypatch.setattr(latest, "refresh", fail)
    with pytest.raises(RuntimeError, match="crash after"):
        hub.push(pkg, "alice/m@1.0.0", hub=store)
    monkeypatch.undo()
    conn = store.connect()
    try:
        counts = [conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("versions", "files", "search")]
    finally:
        conn.close()
    assert counts == [0, 0, 0]
    assert hub.push(pkg, "alice/m@1.0.0", hub=store).version == "1.0.0", "the retry publishes it whole"
    assert [h["name"] for h in hub.search("half", hub=store).hits] == ["m"]


def test_search_gives_the_same_hits_on_both_backends(tmp_path):
    store = hub.Store(tmp_path / "store")
    cards = {
        "alice/my_mod": dict(description="Café reviews, naïve Bayes baseline", task="sentiment", tags=["movies"]),
        "bob/gpt2-news": dict(description="Spanish news topics (2024)", task="topic", language="es"),
        "carol/summ.v2": dict(description="summaries of court rulings", task="summarization", tags=["legal"]),
    }
    for i, (ref, card) in enumerate(cards.items()):
        hub.push(make_package(tmp_path / str(i), seed=i, **card), f"{ref}@1.0.0", hub=store)
    expected = {
        "cafe": ["my_mod"], "CAFÉ": ["my_mod"], "naive bayes": ["my_mod"], "rev": ["my_mod"],
        "my_mod": ["my_mod"], "mod": ["my_mod"], "gpt": ["gpt2-news"], "gpt2 news": ["gpt2-news"],
        "2024": ["gpt2-news"], "spanish topics": ["gpt2-news"], "summ": ["summ.v2"], "v2": ["summ.v2"],
        "legal court": ["summ.v2"], "alice": ["my_mod"], "bob es": ["gpt2-news"], "news legal": [],
        "reviews-news": [], "zzz": [], "'": ["gpt2-news", "my_mod", "summ.v2"],
    }
    got = {q: sorted(h["name"] for h in hub.search(q, hub=store).hits) for q in expected}
    assert got == expected


def test_the_cli_takes_db_and_the_store_remembers_its_database(tmp_path, pg_cluster, hub_backend):
    if hub_backend == "sqlite":
        pytest.skip("PostgreSQL only: --db names a PostgreSQL database")
    from typer.testing import CliRunner

    from polymod.cli import app
    from polymod.hub import binding

    url, root = pg_cluster.new_database(), tmp_path / "store"
    try:
        secret = url.replace("polymod@", "polymod:hunter2@")  # trust auth ignores the password
        result = CliRunner().invoke(app, ["hub", "user", "add", "alice", "--hub", str(root), "--db", secret])
        assert result.exit_code == 0 and result.output.startswith("pmh_"), result.output
        recorded = json.loads((root / binding.MARKER).read_text())
        assert recorded["url"] == url and "hunter2" not in (root / binding.MARKER).read_text()
        assert not (root / binding.INDEX).exists()
        hub.push(make_package(tmp_path / "p"), "alice/m@1.0.0", hub=hub.Store(root))  # found via database.json
        result = CliRunner().invoke(app, ["hub", "check", "--hub", str(root)])
        assert result.exit_code == 0 and "store is consistent" in result.output, result.output
        with pytest.raises(hub.HubError, match="keeps its metadata in PostgreSQL .* pass --db"):
            hub.Store(root, db="sqlite")
        with pytest.raises(hub.HubError, match="already holds the metadata of another store .* whose blobs are not"):
            hub.Store(tmp_path / "elsewhere", db=url)
        other = pg_cluster.new_database()
        hub.Store(tmp_path / "second", db=other)
        with pytest.raises(hub.HubError, match="belongs to the database with store id"):
            hub.Store(root, db=other)
        pg_cluster.drop_database(other)
    finally:
        from polymod.hub import pg

        pg.close_pools()
        pg_cluster.drop_database(url)


def test_connections_the_server_closed_are_replaced(tmp_path, hub_backend, request):
    """PostgreSQL restarted (or ended the hub's sessions): reads retry on a new connection, a write answers
    BusyError (503, retry) once instead of a traceback, and the retry publishes."""
    if hub_backend == "sqlite":
        pytest.skip("PostgreSQL only: SQLite has no server to lose")
    import psycopg

    store = hub.Store(tmp_path / "store")
    hub.push(make_package(tmp_path / "a", description="movie reviews"), "alice/a@1.0.0", hub=store)
    conns = [store.connect() for _ in range(3)]
    for conn in conns:
        conn.execute("SELECT 1")
    for conn in conns:
        conn.close()  # three live connections wait in the pool

    def end_sessions():
        with psycopg.connect(request.getfixturevalue("pg_cluster").url(), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                          (store.db.describe().rsplit("/", 1)[1],))

    end_sessions()
    assert [h["name"] for h in hub.search("movie", hub=store).hits] == ["a"], "the read ran on a new connection"
    end_sessions()
    with pytest.raises(BusyError, match="is unavailable .* retry in a moment"):
        auth.create_token(store, "bob")
    assert auth.authenticate(store, auth.create_token(store, "bob")) == "bob", "the retry wrote it"
