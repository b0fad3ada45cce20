"""Shared fixtures: tiny random hosts of every architecture family, fixed seeds."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)  # tiny hosts: threading costs more than it gives

@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def pg_cluster():
    """A throwaway PostgreSQL server for the session (tests/pg_cluster.py); skips with the reason when none can run."""
    from tests.pg_cluster import Cluster, why_unavailable

    reason = why_unavailable()
    if reason:
        pytest.skip(f"PostgreSQL tests skipped: {reason}")
    cluster = Cluster()
    yield cluster
    from polymod.hub import pg

    pg.close_pools()
    cluster.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def hub_backend(request, monkeypatch):
    """Runs a hub test on each metadata backend. On PostgreSQL every new store directory the test opens without
    naming a database gets a fresh database of the session's cluster (later opens find it in database.json, child
    processes too); a directory already holding an index.sqlite (a client's cache) stays SQLite. The databases
    are dropped after the test."""
    from polymod.hub import db as hub_db

    monkeypatch.delenv(hub_db.DB_ENV, raising=False)
    if request.param == "sqlite":
        yield "sqlite"
        return
    from pathlib import Path

    from polymod.hub import binding, pg
    from polymod.hub.store import Store, home

    cluster = request.getfixturevalue("pg_cluster")
    made: dict = {}
    original = Store.__init__

    def init(self, root=None, busy_timeout=60.0, db=None):
        where = Path(root) if root is not None else home() / "hub"
        if db is None and not (where / binding.MARKER).exists() and not (where / binding.INDEX).exists():
            key = where.resolve()
            db = made[key] = made.get(key) or cluster.new_database()
        original(self, root, busy_timeout, db)

    monkeypatch.setattr(Store, "__init__", init)
    yield "postgresql"
    pg.close_pools()
    for url in made.values():
        cluster.drop_database(url)
