"""A synthetic hub store for the load benchmark (``hub_load.py``), generated once and reused.

The fast path: published versions are written the way :meth:`Store.publish` leaves them — a
``module.json`` blob and a ``weights.safetensors`` blob per version under their sha256, the same
rows (``Store._insert``) and the same search index (``latest.refresh``) — but many versions per
transaction and without the per-version checks and fsyncs of a real publish (the synthetic cards
and weights are valid by construction). ``polymod hub check`` passes on the result.

Shape of the data: modules with 4 versions each on average (1–7, some pre-releases), 500 owners,
names and descriptions drawn from a 300-word vocabulary (Zipf-weighted, so some words match most
modules and some very few), 12 tasks, 10 languages, 4 kinds, 6 host architectures, 1–3 of 60 tags,
10% of versions declaring a lineage parent (an earlier module's version, with its content hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
from pathlib import Path

from polymod.card import Card, Lineage, Parent
from polymod.hub import db, latest, names
from polymod.hub.store import Store

WORDS = [f"{a}{b}" for a in ("sen", "mov", "rev", "new", "top", "tra", "sum", "ner", "qa", "cod", "mat", "law",
                              "med", "fin", "chat", "poe", "his", "geo", "bio", "art")
         for b in ("ti", "ie", "iew", "s", "ic", "ns", "mar", "dy", "ta", "er", "h", "al", "ance", "ory", "o")]
TASKS = ["sentiment", "topic", "ner", "qa", "summarization", "translation", "code", "math", "chat", "nli",
         "paraphrase", "toxicity"]
LANGUAGES = ["en", "de", "fr", "es", "zh", "ja", "ar", "hi", "sw", "pt"]
KINDS = ["lora", "ia3", "adapter", "prompt"]
ARCHITECTURES = ["BertModel", "GPT2LMHeadModel", "LlamaForCausalLM", "T5ForConditionalGeneration",
                 "RobertaModel", "MistralForCausalLM"]
TAGS = [f"tag{i}" for i in range(60)]
SEED_KEY = "bench_seeded_versions"


def _zipf(rng: random.Random, items: list[str], k: int) -> list[str]:
    weights = [1.0 / (i + 1) for i in range(len(items))]
    return rng.choices(items, weights=weights, k=k)


def _weights(rng: random.Random) -> bytes:
    """A small valid safetensors file (one float32 tensor of 64 random values)."""
    header = json.dumps({"lora_A": {"dtype": "F32", "shape": [8, 8], "data_offsets": [0, 256]}}).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + rng.randbytes(256)


def _put_blob(store: Store, data: bytes) -> str:
    """Write a blob without the per-file fsync of a real upload (the fast path; the index is committed after)."""
    sha = hashlib.sha256(data).hexdigest()
    target = store.blob_path(sha)
    if not target.exists():
        target.parent.mkdir(exist_ok=True)
        tmp = store.tmp / f"{uuid.uuid4().hex}.part"
        tmp.write_bytes(data)
        os.replace(tmp, target)
    return sha


def seeded_count(store: Store) -> int:
    """How many synthetic versions this store was seeded with (0 when none)."""
    conn = store.connect()
    try:
        row = conn.execute("SELECT value FROM meta WHERE key=?", (SEED_KEY,)).fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def seed(root: Path, versions: int, seed: int = 0, batch: int = 2000, log=print,
         database: str | None = None) -> Store:
    """Create (or reuse) a store at ``root`` holding ``versions`` synthetic versions; returns it.

    A store seeded earlier with the same count is reused as it is (pushes from earlier runs included).
    ``database``: its metadata database (a ``postgresql://`` URL; default SQLite in ``root``).
    """
    store = Store(root, db=database)
    have = seeded_count(store)
    if have == versions:
        log(f"reusing the seeded store {root} ({versions:,} versions)")
        return store
    if have:
        raise SystemExit(f"{root} was seeded with {have:,} versions, not {versions:,}: remove it or pass --store")
    rng = random.Random(seed)
    start, done, module, published = time.time(), 0, 0, []
    conn = store.connect()
    try:
        while done < versions:
            target = min(versions, done + batch)
            with db.transaction(conn):
                done, module = _batch(store, conn, rng, published, done, target, module)
            log(f"  seeded {done:,}/{versions:,} versions ({time.time() - start:.0f} s)")
        with db.transaction(conn):
            conn.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                         (SEED_KEY, str(versions)))
    finally:
        conn.close()
    log(f"seeded {versions:,} versions in {module:,} modules in {time.time() - start:.1f} s")
    return store


def _batch(store: Store, conn, rng: random.Random, published: list, done: int, target: int,
           module: int) -> tuple[int, int]:
    """Insert versions until ``target`` (inside the caller's transaction); returns (done, modules so far)."""
    while done < target:
        owner = f"user{rng.randrange(500):03d}"
        name = "-".join(_zipf(rng, WORDS, 2)) + f"-{module}"
        module += 1
        count = min(target - done, rng.randint(1, 7))
        kind, arch = rng.choice(KINDS), rng.choice(ARCHITECTURES)
        task, language = rng.choice(TASKS), rng.choice(LANGUAGES)
        tags = sorted(set(_zipf(rng, TAGS, rng.randint(1, 3))))
        for i in range(count):
            version = f"1.{i}.0" if rng.random() > 0.1 else f"1.{i}.0-rc.1"
            parents = []
            if published and rng.random() < 0.1:
                p_owner, p_name, p_version, p_sha = rng.choice(published)
                parents = [Parent(f"{p_owner}/{p_name}", p_version, p_sha, 1.0)]
            card = Card(kind=kind, name=name, owner=owner, version=version, sites=["encoder.layer.0.q"],
                        host={"architecture": arch}, task=task, language=language, tags=tags,
                        description=" ".join(_zipf(rng, WORDS, 8)), license="apache-2.0",
                        metrics={"accuracy": {"value": round(rng.random(), 3)}},
                        lineage=Lineage(parents, {"method": "linear"} if parents else {}))
            body = json.dumps(card.to_dict(), sort_keys=True).encode()
            files = {"module.json": _put_blob(store, body)}
            weights = _weights(rng)
            files["weights.safetensors"] = _put_blob(store, weights)
            sizes = {"module.json": len(body), "weights.safetensors": len(weights)}
            store._insert(conn, owner, name, names.SemVer.parse(version), card, files, sizes,
                          files["weights.safetensors"], owner)
            published.append((owner, name, version, files["weights.safetensors"]))
            done += 1
        latest.refresh(conn, store.db, owner, name)
    return done, module


def throwaway_postgres():
    """Start a throwaway PostgreSQL on loopback (``tests/pg_cluster.py``: initdb + pg_ctl in a temp directory,
    fsync and synchronous commit off); returns (the cluster, a new database's URL). Stop it with ``cluster.stop()``.

    Raises:
        SystemExit: PostgreSQL or psycopg is not installed here (the reason is given).
    """
    from tests.pg_cluster import Cluster, why_unavailable

    reason = why_unavailable()
    if reason:
        raise SystemExit(f"--db postgresql: {reason}")
    cluster = Cluster()
    return cluster, cluster.new_database()
