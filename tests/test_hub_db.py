"""The hub's metadata database: schema versions and migrations, and which database a store opens."""

from __future__ import annotations

import sqlite3

import pytest

import polymod as pm
from polymod import hub
from polymod.hub import auth, db
from tests.hub_helpers import make_package


def _downgrade_to_v1(index):
    """Turn a current SQLite index back into the schema-1 layout that polymod wrote before migrations existed."""
    conn = sqlite3.connect(index)
    conn.execute("ALTER TABLE members RENAME COLUMN username TO user")
    conn.execute("ALTER TABLE tokens RENAME COLUMN username TO user")
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def test_opening_a_schema_1_store_upgrades_it_in_place(tmp_path):
    store = hub.Store(tmp_path / "store")
    hub.push(make_package(tmp_path / "pkg", description="movie reviews"), "alice/senti@1.0.0", hub=store)
    token = auth.create_token(store, "alice")
    _downgrade_to_v1(store.root / "index.sqlite")
    columns = [r[1] for r in sqlite3.connect(store.root / "index.sqlite").execute("PRAGMA table_info(tokens)")]
    assert "user" in columns and "username" not in columns

    again = hub.Store(store.root)
    assert again.db.schema_version() == db.SCHEMA_VERSION == 2
    assert auth.authenticate(again, token) == "alice", "tokens issued before the upgrade still work"
    auth.authorize(again, "alice", "alice")
    assert hub.show("alice/senti@1.0.0", hub=again).card["description"] == "movie reviews"
    assert [h["name"] for h in hub.search("movie", hub=again).hits] == ["senti"]
    hub.push(make_package(tmp_path / "pkg2", seed=3), "alice/senti@1.1.0", hub=again)
    assert again.check() == []
    assert hub.Store(store.root).db.schema_version() == 2, "opening an upgraded store again changes nothing"


def test_a_store_from_a_newer_polymod_is_refused(tmp_path):
    store = hub.Store(tmp_path / "store")
    conn = sqlite3.connect(store.root / "index.sqlite")
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(hub.HubError, match="schema version 99, newer than this polymod's 2: upgrade polymod"):
        hub.Store(store.root)


def test_a_failed_migration_leaves_the_store_as_it_was(tmp_path, monkeypatch):
    store = hub.Store(tmp_path / "store")
    _downgrade_to_v1(store.root / "index.sqlite")
    monkeypatch.setitem(db.MIGRATIONS, 2, (*db.MIGRATIONS[2], "ALTER TABLE no_such_table ADD COLUMN x TEXT"))
    with pytest.raises(sqlite3.OperationalError, match="no_such_table"):
        hub.Store(store.root)
    conn = sqlite3.connect(store.root / "index.sqlite")
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()[0] == "1"
    assert "user" in [r[1] for r in conn.execute("PRAGMA table_info(members)")], "the rename was rolled back"


def test_database_urls_are_checked(tmp_path, monkeypatch):
    monkeypatch.delenv(db.DB_ENV, raising=False)
    with pytest.raises(pm.ConfigError, match=r"unknown hub database 'mysql://u@h/x': expected 'sqlite' or a "
                                              r"postgresql:// URL"):
        hub.Store(tmp_path / "a", db="mysql://u:secret@h/x")
    sqlite_store = hub.Store(tmp_path / "b")
    with pytest.raises(hub.HubError, match="cannot take over an existing SQLite store"):
        hub.Store(sqlite_store.root, db="postgresql://nobody@127.0.0.1:1/none")
    assert db.redact("postgresql://hub:s3cret@db:5432/x") == "postgresql://hub@db:5432/x"


def test_sqlite_is_the_default_and_the_environment_variable_is_read(tmp_path, monkeypatch):
    monkeypatch.delenv(db.DB_ENV, raising=False)
    assert hub.Store(tmp_path / "a").db.backend == "sqlite"
    monkeypatch.setenv(db.DB_ENV, "sqlite")
    assert hub.Store(tmp_path / "b").db.backend == "sqlite"
    monkeypatch.setenv(db.DB_ENV, "oracle://x")
    with pytest.raises(pm.ConfigError, match="unknown hub database 'oracle://x'"):
        hub.Store(tmp_path / "c")
