"""The server's transfer paths: streamed upload limits, disk writes off the event loop, download counts."""

from __future__ import annotations

import asyncio
import socket
import time

import httpx
import pytest

from polymod import hub
from polymod.hub.auth import create_token
from polymod.hub.remote import RemoteHub
from polymod.hub.store import BlobWriter
from tests.hub_helpers import hub_thread, make_package


def _chunked_put(url: str, token: str, total: int, chunk: int = 64 << 10) -> tuple[bytes, int]:
    """PUT a chunked body of ``total`` bytes over a raw socket, reading the answer between chunks.

    Returns the first bytes of the answer and how many body bytes were sent before it came.
    """
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(f"PUT /api/v1/blobs/{'0' * 64} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                 "Transfer-Encoding: chunked\r\n\r\n".encode())
    sent = 0
    try:
        while sent < total:
            sock.sendall(b"%x\r\n" % chunk + b"x" * chunk + b"\r\n")
            sent += chunk
            sock.settimeout(0.05)
            try:
                answer = sock.recv(4096)
                if answer:
                    return answer, sent
            except TimeoutError:
                pass
            sock.settimeout(10)
        sock.sendall(b"0\r\n\r\n")
        return sock.recv(4096), sent
    except (BrokenPipeError, ConnectionResetError):
        sock.settimeout(2)
        return sock.recv(4096), sent
    finally:
        sock.close()


def test_a_chunked_upload_over_the_limit_is_refused_before_it_ends(tmp_path):
    store = hub.Store(tmp_path / "s")
    token = create_token(store, "alice")
    with hub_thread(store, max_upload_bytes=1 << 20) as url:
        answer, sent = _chunked_put(url, token, total=256 << 20)
        assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
        assert sent < 64 << 20, f"the server read {sent:,} bytes of a body over its 1 MiB limit before answering"
        assert httpx.get(f"{url}/api/v1/health").status_code == 200
    assert not list(store.tmp.iterdir()), "the partial upload is removed"


def test_upload_writes_run_on_worker_threads(tmp_path, monkeypatch):
    store = hub.Store(tmp_path / "s")
    token = create_token(store, "alice")
    on_loop = []
    original = BlobWriter.write

    def write(self, chunk):
        try:
            asyncio.get_running_loop()
            on_loop.append(len(chunk))
        except RuntimeError:
            pass
        return original(self, chunk)

    monkeypatch.setattr(BlobWriter, "write", write)
    with hub_thread(store) as url:
        info = hub.push(make_package(tmp_path / "p"), "alice/m@1.0.0", hub=RemoteHub(url, token, cache=tmp_path / "c"))
    assert info.version == "1.0.0"
    assert on_loop == [], "upload bytes were written to disk on the event loop"


def _eventually(check, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_downloads_count_complete_pulls_per_version(tmp_path):
    store = hub.Store(tmp_path / "s")
    token = create_token(store, "alice")
    pkg = make_package(tmp_path / "p")
    with hub_thread(store) as url:
        pusher = RemoteHub(url, token, cache=tmp_path / "push-cache")
        hub.push(pkg, "alice/m@1.0.0", hub=pusher)
        hub.push(pkg, "alice/m@1.1.0", hub=pusher)  # same weights: counts still apart, per version
        first = RemoteHub(url, cache=tmp_path / "c1")
        hub.pull("alice/m@1.0.0", tmp_path / "d1", hub=first)
        hub.pull("alice/m@1.0.0", tmp_path / "d2", hub=first)  # served from the client's cache: not a download
        hub.pull("alice/m@1.0.0", tmp_path / "d3", hub=RemoteHub(url, cache=tmp_path / "c2"))
        hub.pull("alice/m@1.1.0", tmp_path / "d4", hub=RemoteHub(url, cache=tmp_path / "c3"))
        card = hub.show("alice/m@1.0.0", hub=url).files["module.json"]["sha256"]
        assert httpx.head(f"{url}/api/v1/blobs/{card}").status_code == 200  # HEAD is not a download
        # a count is added just after the body's last byte is sent, so a reader may look a moment before it lands
        assert _eventually(lambda: hub.show("alice/m@1.1.0", hub=url).downloads == 1)
        time.sleep(0.3)
        assert hub.show("alice/m@1.0.0", hub=url).downloads == 2
        assert [v.downloads for v in hub.versions("alice/m", hub=url)] == [1, 2]
        assert "2 downloads" in httpx.get(f"{url}/m/alice/m/1.0.0").text
        assert hub.search("", hub=url).hits[0]["downloads"] == 1, "the latest version's count"


def test_counts_wait_while_the_index_is_locked(tmp_path):
    from polymod.hub.server import DownloadCounter

    store = hub.Store(tmp_path / "s")
    hub.push(make_package(tmp_path / "p"), "alice/m@1.0.0", hub=store)
    card = hub.show("alice/m@1.0.0", hub=store).files["module.json"]["sha256"]
    counter = DownloadCounter(store, interval=3600)
    counter.add(card)
    holder = store.connect()
    holder.execute("BEGIN IMMEDIATE")
    start = time.monotonic()
    assert counter.flush() is False and time.monotonic() - start < 1.0, "a busy index never stalls a download"
    holder.execute("ROLLBACK")
    holder.close()
    assert counter.flush() is True and counter.pending == {}
    conn = store.connect()
    assert conn.execute("SELECT count FROM downloads").fetchone()[0] == 1
    conn.close()


@pytest.mark.parametrize("limit", [1, 100])
def test_cli_search_pages(tmp_path, limit):
    from typer.testing import CliRunner

    from polymod.cli import app

    store = hub.Store(tmp_path / "s")
    pkg = make_package(tmp_path / "p", description="movie")
    for i in range(3):
        hub.push(pkg, f"alice/m{i}@1.0.0", hub=store)
    out = CliRunner().invoke(app, ["hub", "search", "movie", "--limit", str(limit), "--offset", "1",
                                   "--hub", str(tmp_path / "s")]).output
    if limit == 1:
        assert "3 module(s), 2-2 shown" in out and "more: --offset 2" in out
    else:
        assert "3 module(s), 2-3 shown" in out and "more:" not in out
