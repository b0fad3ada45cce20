"""Abuse of the hub server: safetensors header bombs and invalid weights cost bounded time, once per content."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import json
import struct
import threading
import time

import httpx
import pytest

from polymod import hub
from polymod.card import FORMAT_VERSION
from polymod.hub import store as store_module
from polymod.hub.auth import create_token
from polymod.hub.db import transaction
from polymod.hub.package import MAX_HEADER_BYTES, MAX_TENSORS, check_safetensors
from tests.hub_helpers import hub_thread

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL


def _safetensors(header: dict, data: bytes = b"") -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def _bomb(tensors: int) -> bytes:
    """Many empty tensors: a small file whose header is costly to parse."""
    raw = b"{" + b",".join(b'"t%d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i for i in range(tensors)) + b"}"
    return struct.pack("<Q", len(raw)) + raw


@pytest.mark.parametrize("escape", [False, True])
def test_header_over_the_tensor_limit_is_refused_fast(escape):
    blob = _bomb(MAX_TENSORS + 1)
    if escape:  # the same JSON, spelled so that a byte count of the key finds nothing: the parse still stops
        blob = blob.replace(b'"data_offsets"', b'"data\\u005foffsets"')
        blob = struct.pack("<Q", len(blob) - 8) + blob[8:]
    start = time.perf_counter()
    with pytest.raises(hub.IntegrityError, match=f"more than {MAX_TENSORS:,} tensors, the limit"):
        check_safetensors(io.BytesIO(blob), len(blob))
    assert time.perf_counter() - start < 2.0
    ok = _bomb(100)
    check_safetensors(io.BytesIO(ok), len(ok))


def test_header_over_the_size_limit_is_refused_before_it_is_read():
    class Refuse(io.BytesIO):
        def read(self, n=-1):
            if n < 0 or n > 9:  # the length and the header's first byte only
                raise AssertionError("the header was read")
            return super().read(n)

    f = Refuse(struct.pack("<Q", MAX_HEADER_BYTES + 1))
    with pytest.raises(hub.IntegrityError, match=f"exceeds the limit of {MAX_HEADER_BYTES:,} bytes"):
        check_safetensors(f, 1 << 40)


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "without gaps or overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "without gaps or overlaps"),
    ({"a": {"dtype": "F32", "shape": [2.5], "data_offsets": [0, 8]}}, b"\0" * 8, "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"", "non-negative integers"),
    ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "non-negative integers"),
    ({"a": {"dtype": "X9", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "malformed header entry"),
    ({"__metadata__": {"k": 1}}, b"", "__metadata__ must map strings to strings"),
])
def test_invalid_safetensors_are_refused(header, data, match):
    blob = _safetensors(header, data)
    with pytest.raises(hub.IntegrityError, match=match):
        check_safetensors(io.BytesIO(blob), len(blob))


def test_header_bomb_keeps_the_server_responsive_and_is_checked_once(tmp_path, monkeypatch):
    """Three publishes of a weights file holding ~MAX_HEADER_BYTES of empty tensors: /health keeps answering
    within a fraction of a second, each publish is refused, and the header is parsed once for all three."""
    calls = []
    real = store_module.check_safetensors
    monkeypatch.setattr(store_module, "check_safetensors", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    store = hub.Store(tmp_path / "server")
    token = create_token(store, "alice")
    card_raw = json.dumps({"format_version": FORMAT_VERSION, "kind": "lora", "owner": "alice", "name": "bomb",
                           "version": "1.0.0"}).encode()
    bomb = _bomb(MAX_HEADER_BYTES // 58)
    assert MAX_HEADER_BYTES * 0.8 < len(bomb) - 8 <= MAX_HEADER_BYTES
    auth = {"Authorization": f"Bearer {token}"}
    with hub_thread(store) as url, httpx.Client(base_url=url, timeout=60) as http:
        shas = {}
        for raw in (card_raw, bomb):
            shas[raw] = hashlib.sha256(raw).hexdigest()
            assert http.put(f"/api/v1/blobs/{shas[raw]}", content=raw, headers=auth).status_code == 201
        body = {"version": "1.0.0", "files": {"module.json": shas[card_raw], "weights.safetensors": shas[bomb]}}
        answers, latencies, done = [], [], threading.Event()

        def publish():
            for _ in range(3):
                answers.append(http.post("/api/v1/modules/alice/bomb/versions", json=body, headers=auth))
            done.set()

        worker = threading.Thread(target=publish)
        worker.start()
        while not done.is_set():
            t = time.perf_counter()
            assert http.get("/api/v1/health").status_code == 200
            latencies.append(time.perf_counter() - t)
            time.sleep(0.01)
        worker.join()
    assert [r.status_code for r in answers] == [422] * 3
    assert all("tensors, the limit" in r.json()["detail"] for r in answers)
    assert len(calls) == 1, "identical content is checked once"
    assert max(latencies) < 0.5, f"/health took up to {max(latencies):.2f} s"
    with pytest.raises(hub.NotFoundError):
        store.get("alice", "bomb", "1.0.0")


def test_a_second_server_on_the_same_store_touches_no_upload(tmp_path, hub_backend):
    """SQLite: a second server is refused. PostgreSQL: several servers share a store, each with its own uploads."""
    from polymod.hub.server import create_app

    store = hub.Store(tmp_path / "server")
    with hub_thread(store):
        in_flight = store.tmp / "upload-in-progress.part"
        in_flight.write_bytes(b"half")
        if hub_backend == "sqlite":
            with pytest.raises(hub.HubError, match=r"already served by another hub server \(pid \d+\)"):
                create_app(hub.Store(tmp_path / "server"))
        else:
            second = create_app(hub.Store(tmp_path / "server"))
            assert second.state.store.tmp != store.tmp and second.state.store.tmp.is_dir()
            second.state.lock.release()
        assert in_flight.read_bytes() == b"half", "the first server's upload survives"
    create_app(store).state.lock.release()  # free again once the first server stopped


def test_the_uploads_of_a_server_that_died_are_swept_by_the_next(tmp_path):
    from polymod.hub.server import create_app

    first = create_app(hub.Store(tmp_path / "server"))
    orphan = first.state.store.tmp / "cut-off.part"
    orphan.write_bytes(b"half")
    first.state.lock.release()  # what the kernel does when the server dies
    second = create_app(hub.Store(tmp_path / "server"))
    try:
        assert not orphan.exists()
        assert hub.Store(tmp_path / "server").check() == []
    finally:
        second.state.lock.release()


def test_held_write_lock_answers_503_with_retry_after_and_reads_stay_fast(tmp_path):
    """A writer holding the index: publishes answer 503 + Retry-After after the write timeout (no hang),
    while /health and search keep answering at once (WAL / MVCC readers never wait for the writer)."""
    store = hub.Store(tmp_path / "server")
    token = create_token(store, "alice")
    card = json.dumps({"format_version": FORMAT_VERSION, "kind": "composition", "owner": "alice", "name": "c",
                       "version": "1.0.0", "config": {}}).encode()
    blocker = store.connect()
    with hub_thread(store, write_timeout=0.5) as url, httpx.Client(base_url=url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {token}"}
        sha = hashlib.sha256(card).hexdigest()
        assert http.put(f"/api/v1/blobs/{sha}", content=card, headers=auth).status_code == 201
        held = transaction(blocker)  # the write lock: BEGIN IMMEDIATE on SQLite, the advisory lock on PostgreSQL
        held.__enter__()
        try:
            body = {"version": "1.0.0", "files": {"module.json": sha}}
            with cf.ThreadPoolExecutor(8) as pool:
                posts = [pool.submit(http.post, "/api/v1/modules/alice/c/versions", json=body, headers=auth)
                         for _ in range(8)]
                t = time.perf_counter()
                assert http.get("/api/v1/health").status_code == 200
                assert http.get("/api/v1/search", params={"q": "c"}).status_code == 200
                read_latency = time.perf_counter() - t
                answers = [p.result() for p in posts]
        finally:
            held.__exit__(None, None, None)
            blocker.close()
        assert {r.status_code for r in answers} == {503}, [r.text for r in answers]
        assert all(r.headers.get("Retry-After") == "1" and r.json()["error"] == "BusyError" for r in answers)
        assert read_latency < 1.0, f"reads took {read_latency:.2f} s behind a held write lock"
        assert http.post("/api/v1/modules/alice/c/versions", json=body, headers=auth).status_code == 201
