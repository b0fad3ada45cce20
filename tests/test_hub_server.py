"""The hub server over HTTP: round trips between machines, authentication, limits, concurrency, crashes."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import socket
import time

import httpx
import pytest
import torch

import polymod as pm
from polymod import hub
from polymod.hub.auth import create_token
from polymod.hub.package import WEIGHTS_FILE, file_sha256
from polymod.hub.remote import RemoteHub
from tests.hosts import logits, make_batch, make_host
from tests.hub_helpers import free_port, hub_thread, make_package, start_hub_process

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL


@pytest.fixture
def server(tmp_path):
    store = hub.Store(tmp_path / "server")
    tokens = {"alice": create_token(store, "alice"), "bob": create_token(store, "bob"),
              "expired": create_token(store, "carol", expires_in=-1)}
    with hub_thread(store) as url:
        yield url, store, tokens


def _client(url, token, tmp_path, name="cache"):
    return RemoteHub(url, token, cache=tmp_path / name)


def _versions(store) -> int:
    conn = store.connect()
    try:
        return conn.execute("SELECT COUNT(*) FROM versions").fetchone()[0]
    finally:
        conn.close()


def test_push_on_one_machine_pull_on_another_gives_identical_outputs(tmp_path, server):
    url, store, tokens = server
    pkg = make_package(tmp_path / "pkg", description="movie sentiment", task="sentiment", tags=["movies"])
    info = hub.push(pkg, "alice/senti@1.0.0", hub=_client(url, tokens["alice"], tmp_path, "machine1"))
    assert info.uploader == "alice" and info.sha256 == file_sha256(pkg / WEIGHTS_FILE)
    second = _client(url, None, tmp_path, "machine2")  # anonymous reads
    assert [h["name"] for h in hub.search("movie", hub=second).hits] == ["senti"]
    path = hub.pull("alice/senti", hub=second)
    assert path.is_relative_to(tmp_path / "machine2")
    assert hub.show("alice/senti@1.0.0", hub=tmp_path / "machine2").sha256 == info.sha256, "cached in the index"
    host_a, host_b, batch = make_host("bert"), make_host("bert"), make_batch("bert")
    a, b = pm.Modular(host_a), pm.Modular(host_b)
    a.add("m", pm.load(pkg)), b.add("m", pm.load(path))
    a.use("m"), b.use("m")
    assert torch.equal(logits(host_a, batch), logits(host_b, batch))
    assert hub.lineage("alice/senti", hub=second)["root"] == "alice/senti@1.0.0"
    assert [v.version for v in hub.versions("alice/senti", hub=second)] == ["1.0.0"]


@pytest.mark.parametrize("who,target,error,match", [
    (None, "alice/m@1.0.0", hub.AuthError, "needs a token"),
    ("pmh_wrong", "alice/m@1.0.0", hub.AuthError, "not valid"),
    ("expired", "carol/m@1.0.0", hub.AuthError, "expired"),
    ("bob", "alice/m@1.0.0", hub.ForbiddenError, "may not publish in namespace 'alice'"),
])
def test_rejected_pushes_write_nothing(tmp_path, server, who, target, error, match):
    url, store, tokens = server
    pkg = make_package(tmp_path / "pkg")
    with pytest.raises(error, match=match):
        hub.push(pkg, target, hub=_client(url, tokens.get(who, who), tmp_path))
    assert _versions(store) == 0 and not list(store.blobs.glob("*/*")) and not list(store.tmp.iterdir())
    body = {"version": "1.0.0", "files": {"module.json": "0" * 64}}
    response = httpx.post(f"{url}/api/v1/modules/alice/m/versions", json=body,
                          headers={"Authorization": f"Bearer {tokens.get(who, who)}"} if who else {})
    assert response.status_code in (401, 403) and response.json()["error"] in ("AuthError", "ForbiddenError")


def test_granted_member_may_publish_in_an_organisation(tmp_path, server):
    url, store, tokens = server
    from polymod.hub.auth import grant

    grant(store, "nlp-lab", "bob")
    assert hub.push(make_package(tmp_path / "p"), "nlp-lab/m@1.0.0", hub=_client(url, tokens["bob"], tmp_path)).ref
    with pytest.raises(hub.ForbiddenError):
        hub.yank("nlp-lab/m@1.0.0", hub=_client(url, tokens["alice"], tmp_path))


@pytest.mark.parametrize("path", [
    "/api/v1/modules/alice/..%2F..%2Fetc/versions/1.0.0",
    "/api/v1/modules/alice/a%00b/versions/1.0.0",
    "/api/v1/modules/alice/" + "a" * 5000 + "/versions/1.0.0",
    "/api/v1/modules/Alice/m/versions/1.0.0",
    "/api/v1/modules/alice/m/versions/1.0",
    "/api/v1/modules/alice/m/versions/" + "1" * 70 + ".0.0",
])
def test_bad_names_are_rejected_over_http(server, path):
    url, store, tokens = server
    response = httpx.post(url + path.rsplit("/", 1)[0], json={"version": "1.0.0", "files": {}},
                          headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert response.status_code in (404, 422)
    assert httpx.get(url + path).status_code in (404, 422)
    assert _versions(store) == 0


def test_upload_size_limit(tmp_path):
    store = hub.Store(tmp_path / "server")
    token = create_token(store, "alice")
    with hub_thread(store, max_upload_bytes=2000) as url:
        with pytest.raises(hub.TooLargeError, match="exceeds this hub's limit of 2,000"):
            hub.push(make_package(tmp_path / "p"), "alice/m@1.0.0", hub=_client(url, token, tmp_path))

        def body():  # chunked, no Content-Length: the limit is enforced while streaming
            for _ in range(10):
                yield b"x" * 1000

        response = httpx.put(f"{url}/api/v1/blobs/{'0' * 64}", content=body(),
                             headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 413
    assert _versions(store) == 0 and not list(store.tmp.iterdir())


def test_openapi_schema_documents_the_api(server):
    url, _, _ = server
    schema = httpx.get(f"{url}/openapi.json").json()
    for path in ("/api/v1/search", "/api/v1/modules/{owner}/{name}/versions",
                 "/api/v1/modules/{owner}/{name}/versions/{version}/lineage", "/api/v1/blobs/{sha256}"):
        assert path in schema["paths"], path
    assert "VersionOut" in schema["components"]["schemas"]


def test_tampered_blob_on_server_is_rejected_on_pull(tmp_path, server):
    url, store, tokens = server
    info = hub.push(make_package(tmp_path / "p"), "alice/m@1.0.0", hub=_client(url, tokens["alice"], tmp_path))
    blob = store.blob_path(info.files[WEIGHTS_FILE]["sha256"])
    blob.write_bytes(blob.read_bytes()[:-4] + b"\x00\x00\x00\x00")
    client = _client(url, None, tmp_path, "other")
    with pytest.raises(hub.IntegrityError, match="expected"):
        hub.pull("alice/m@1.0.0", tmp_path / "out", hub=client)
    assert not (tmp_path / "out").exists() and not client.cache.has_blob(info.files[WEIGHTS_FILE]["sha256"])


def test_fifty_concurrent_pushes_all_present_none_corrupt(tmp_path, server):
    url, store, tokens = server
    packages = [make_package(tmp_path / f"p{i}", seed=i, rank=1 + i % 3) for i in range(10)]
    jobs = [(packages[(m + v) % 10], f"{'alice' if m % 2 else 'bob'}/mod{m}@1.{v}.0")
            for m in range(10) for v in range(5)]
    clients = {o: _client(url, tokens[o], tmp_path, f"c-{o}") for o in ("alice", "bob")}

    def push(job):
        pkg, ref = job
        return hub.push(pkg, ref, hub=clients[ref.split("/")[0]]).ref

    start = time.perf_counter()
    with cf.ThreadPoolExecutor(16) as pool:
        done = list(pool.map(push, jobs))
    elapsed = time.perf_counter() - start
    print(f"\n50 concurrent pushes over HTTP: {elapsed:.2f} s")
    assert sorted(done) == sorted(ref for _, ref in jobs)
    assert _versions(store) == 50 and store.check() == []
    reader = _client(url, None, tmp_path, "reader")
    for pkg, ref in jobs:
        out = hub.pull(ref, tmp_path / "pulled" / ref.replace("/", "_"), hub=reader)
        assert file_sha256(out / WEIGHTS_FILE) == file_sha256(pkg / WEIGHTS_FILE)
    assert len(list(store.blobs.glob("*/*"))) == 10 + 50, "10 distinct weight files deduplicated + 50 cards"


def _start_upload(port: int, token: str, declared: int, sent: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall((f"PUT /api/v1/blobs/{'ab' * 32} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
                  f"Content-Length: {declared}\r\nContent-Type: application/octet-stream\r\n\r\n").encode())
    sock.sendall(b"z" * sent)
    return sock


def _uploads(store) -> list:
    """Uploads in progress: in tmp/ (SQLite) or in a server's own tmp/server-<id>/ (PostgreSQL)."""
    return list(store.tmp.rglob("*.part"))


def test_server_killed_during_upload_leaves_no_partial_version(tmp_path):
    root, port = tmp_path / "server", free_port()
    store = hub.Store(root)
    token = create_token(store, "alice")
    packages = [make_package(tmp_path / f"p{i}", seed=i) for i in range(12)]
    proc = start_hub_process(root, port)
    try:
        sock = _start_upload(port, token, declared=8 << 20, sent=1 << 20)
        deadline = time.time() + 10
        while not _uploads(store) and time.time() < deadline:
            time.sleep(0.05)
        assert _uploads(store), "the upload is in progress on the server"
        client = _client(f"http://127.0.0.1:{port}", token, tmp_path)
        pool = cf.ThreadPoolExecutor(4)
        futures = [pool.submit(hub.push, p, f"alice/m{i}@1.0.0", hub=client) for i, p in enumerate(packages)]
        while not any(f.done() for f in futures) and time.time() < deadline + 20:
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)  # as soon as the first push has completed, the others in flight
        proc.wait(10)
        outcomes = [f.exception(timeout=30) for f in futures]
        pool.shutdown()
        sock.close()
    finally:
        if proc.poll() is None:
            proc.kill()
    proc = start_hub_process(root, port)
    try:
        assert not _uploads(store), "the partial upload was swept at start-up"
        assert not store.has_blob("ab" * 32)
        assert store.check() == []
        listed = {h["name"] for h in hub.search("", hub=root, limit=100).hits}
        for i, p in enumerate(packages):
            name = f"m{i}"
            if name in listed:  # a version that is visible is complete and verifies
                out = hub.pull(f"alice/{name}@1.0.0", tmp_path / "check" / name, hub=_client(
                    f"http://127.0.0.1:{port}", None, tmp_path, "reader"))
                assert file_sha256(out / WEIGHTS_FILE) == file_sha256(p / WEIGHTS_FILE)
            else:
                assert outcomes[i] is not None, f"push of {name} reported success but is not visible"
        assert 0 < len(listed) < len(packages), "the kill landed while pushes were in flight"
        print(f"\nkilled mid-upload: {len(listed)} of {len(packages)} concurrent pushes had completed, "
              f"{sum(o is not None for o in outcomes)} failed cleanly")
        retry = hub.push(packages[0], "alice/m0@1.0.0", hub=_client(f"http://127.0.0.1:{port}", token, tmp_path))
        assert retry.ref == "alice/m0@1.0.0"
    finally:
        proc.terminate()
        proc.wait(10)
