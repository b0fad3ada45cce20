"""Search latency of the hub's two metadata backends on the same synthetic store.

Seeds N modules (one version each: owner, name, description of random words, facets) straight into the tables
search reads — ``versions``, ``latest``, the full-text index, ``tags`` — through the backend's own SQL
(:meth:`polymod.hub.db.Database.index_search`), not through publish (no blobs, no weights checks: this measures
the index, not uploads). Then runs a fixed mix of queries (text, prefix, facet, text + facet, no match, empty)
through :func:`polymod.hub.query.search` one after the other and prints p50 / p99 per backend.

PostgreSQL: a throwaway server (tests/pg_cluster.py: initdb + pg_ctl on 127.0.0.1, removed afterwards), or
``--pg-url`` for an existing empty database.

    python benchmarks/hub_search_backends.py --versions 100000 --rounds 20
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "src")]

from polymod.hub import db as hubdb  # noqa: E402
from polymod.hub import pg  # noqa: E402
from polymod.hub.query import search  # noqa: E402
from polymod.hub.store import Store  # noqa: E402

WORDS = ("sentiment movie review news topic legal court summary spanish french german lora adapter prompt "
         "medical clinical finance tweet emotion toxic question answer code python translation").split()
QUERIES = [("court", {}), ("spani", {}), ("movie review", {}), ("", {"kind": "lora"}), ("legal", {"language": "es"}),
           ("zzzz", {}), ("", {}), ("m123", {}), ("", {"tag": "t7"})]


def seed(store: Store, n: int, rng: random.Random) -> float:
    """Insert ``n`` one-version modules (ids 1..n, in batches of 5,000); returns the seconds it took."""
    start = time.perf_counter()
    conn = store.connect()
    try:
        for first in range(0, n, 5000):
            versions, tags, latest, texts = [], [], [], []
            for i in range(first, min(n, first + 5000)):
                vid, owner, name = i + 1, f"user{i % 997}", f"m{i}"
                desc = " ".join(rng.choice(WORDS) for _ in range(10))
                kind, lang, tag = rng.choice(["lora", "ia3", "adapter"]), rng.choice(["en", "es", "fr"]), f"t{i % 50}"
                versions.append((vid, owner, name, f"{i:064x}", kind, lang, desc,
                                 json.dumps({"tags": [tag], "metrics": {}}), float(i)))
                tags.append((vid, tag))
                latest.append((owner, name, vid, kind, "BertModel", "classification", lang, float(i)))
                texts.append((vid, {"owner": owner, "name": name, "description": desc, "task": "classification",
                                    "language": lang, "tags": tag, "kind": kind, "architecture": "BertModel"}))
            with hubdb.transaction(conn):
                conn.executemany(
                    "INSERT INTO versions (id, owner, name, version, major, minor, patch, prerelease, sha256, kind, "
                    "architecture, task, language, license, description, card, size, uploader, created) "
                    "VALUES (?,?,?,'1.0.0',1,0,0,'[]',?,?,'BertModel','classification',?,NULL,?,?,1,NULL,?)", versions)
                conn.executemany("INSERT INTO tags VALUES (?, ?)", tags)
                conn.executemany("INSERT INTO latest VALUES (?,?,?,?,?,?,?,?)", latest)
                if store.db.backend == "postgresql":  # one pipelined batch instead of a round trip per module
                    conn.executemany("INSERT INTO search (version_id, doc) VALUES (?, ?::tsvector)",
                                     [(vid, pg.tsvector([f[k] for k in hubdb.SEARCH_FIELDS])) for vid, f in texts])
                else:
                    for vid, fields in texts:
                        store.db.index_search(conn, vid, fields)
    finally:
        conn.close()
    return time.perf_counter() - start


def measure(store: Store, rounds: int) -> dict[str, float]:
    """p50 / p99 / max milliseconds of :data:`QUERIES` run ``rounds`` times (after one warm-up round)."""
    for q, facets in QUERIES:
        search(store, q, **facets)
    times, per_query = [], {}
    for _ in range(rounds):
        for q, facets in QUERIES:
            t = time.perf_counter()
            search(store, q, **facets)
            times.append((time.perf_counter() - t) * 1000)
            per_query.setdefault(f"{q!r} {facets}", []).append(times[-1])
    times.sort()
    medians = {k: round(statistics.median(v), 1) for k, v in per_query.items()}
    return {"p50_ms": round(statistics.median(times), 1), "p99_ms": round(times[int(0.99 * (len(times) - 1))], 1),
            "max_ms": round(times[-1], 1), "searches": len(times), "median_ms_per_query": medians}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-url", default=None, help="an existing empty PostgreSQL database (default: throwaway)")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="polymod-search-bench-") as tmp:
        for backend in args.backends.split(","):
            cluster = None
            if backend == "sqlite":
                store = Store(Path(tmp) / "sqlite", db="sqlite")
            else:
                url = args.pg_url
                if url is None:
                    from tests.pg_cluster import Cluster

                    cluster = Cluster()
                    url = cluster.new_database()
                store = Store(Path(tmp) / "pg", db=url)
            try:
                seconds = seed(store, args.versions, random.Random(0))
                if backend == "postgresql":
                    conn = store.connect()
                    conn.execute("ANALYZE")
                    conn.close()
                results[backend] = {"seed_s": round(seconds, 1), **measure(store, args.rounds)}
                print(backend, results[backend], flush=True)
            finally:
                store.db.close()
                if cluster is not None:
                    cluster.stop()
    print(json.dumps({"versions": args.versions, "results": results}, indent=1))


if __name__ == "__main__":
    main()
