"""What the client trusts: tokens go only to their own hub, caches are per hub, cached blobs are re-verified,
and a hub cannot stream more than its manifest says."""

from __future__ import annotations

import json

import httpx
import pytest

from polymod import hub
from polymod.hub.remote import RemoteHub, cache_dir, hub_key, save_token
from tests.hub_helpers import hub_thread, make_package

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("POLYMOD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("POLYMOD_HUB", raising=False)
    monkeypatch.delenv("POLYMOD_TOKEN", raising=False)
    return tmp_path / "home"


def test_hub_key_normalises_one_hub_and_separates_others():
    assert hub_key("http://HUB.example/") == hub_key("http://hub.example:80") == "http://hub.example:80"
    assert hub_key("https://hub.example") == "https://hub.example:443"
    assert len({hub_key(u) for u in ("http://h:8000", "http://h:8001", "https://h:8000", "http://h:8000/x")}) == 4
    with pytest.raises(hub.HubError, match="is not of the form"):
        hub_key("ftp://h")


def test_env_token_is_sent_only_to_the_hub_it_names(home, monkeypatch):
    monkeypatch.setenv("POLYMOD_TOKEN", "pmh_secret")
    assert RemoteHub("http://127.0.0.1:8000").token is None, "no $POLYMOD_HUB: no hub to bind the token to"
    monkeypatch.setenv("POLYMOD_HUB", "http://127.0.0.1:8000/")
    assert RemoteHub("http://127.0.0.1:8000").token == "pmh_secret"
    assert RemoteHub("http://127.0.0.1:8001").token is None
    assert RemoteHub("http://evil.example:8000").token is None


def test_saved_tokens_are_bound_to_their_hub(home):
    save_token("http://127.0.0.1:8000", "pmh_a")
    assert RemoteHub("http://127.0.0.1:8000/").token == "pmh_a"
    assert RemoteHub("http://127.0.0.1:9000").token is None


def test_an_untrusted_hub_never_receives_the_token(home, tmp_path, monkeypatch):
    store = hub.Store(tmp_path / "evil")
    seen = []
    with hub_thread(store) as evil:
        real = httpx.Client.request

        def spy(self, method, url, **kw):
            seen.append((kw.get("headers") or {}).get("Authorization"))
            return real(self, method, url, **kw)

        monkeypatch.setattr(httpx.Client, "request", spy)
        monkeypatch.setenv("POLYMOD_HUB", "http://127.0.0.1:1")  # the user's own hub, elsewhere
        monkeypatch.setenv("POLYMOD_TOKEN", "pmh_secret")
        save_token("http://127.0.0.1:1", "pmh_saved")
        with pytest.raises(hub.NotFoundError):
            hub.show("alice/m", hub=evil)
    assert seen and not any(seen), "no Authorization header went to the other hub"


def test_cache_is_per_hub_so_a_first_answer_does_not_own_the_name(home, tmp_path):
    stores = [hub.Store(tmp_path / "rogue"), hub.Store(tmp_path / "real")]
    for seed, s in enumerate(stores):
        hub.push(make_package(tmp_path / f"p{seed}", seed=seed), "alice/senti@1.0.0", hub=s)
    with hub_thread(stores[0]) as rogue, hub_thread(stores[1]) as real:
        hub.pull("alice/senti@1.0.0", hub=rogue)
        path = hub.pull("alice/senti@1.0.0", hub=real)
        assert cache_dir(rogue) != cache_dir(real)
        assert hub.Store(cache_dir(real)).get("alice", "senti", "1.0.0").sha256 == stores[1].get(
            "alice", "senti", "1.0.0").sha256
    from polymod.hub.package import content_hash

    assert content_hash(path) == stores[1].get("alice", "senti", "1.0.0").sha256


def test_corrupted_cached_blob_is_evicted_and_fetched_again(home, tmp_path):
    store = hub.Store(tmp_path / "server")
    info = hub.push(make_package(tmp_path / "p"), "alice/m@1.0.0", hub=store)
    with hub_thread(store) as url:
        client = RemoteHub(url, cache=tmp_path / "cache")
        client.pull("alice/m@1.0.0", tmp_path / "a")
        blob = client.cache.blob_path(info.sha256)
        blob.write_bytes(b"\0" * blob.stat().st_size)
        client.pull("alice/m@1.0.0", tmp_path / "b")
    assert client.cache.verify_blob(info.sha256, info.files["weights.safetensors"]["size"])
    assert (tmp_path / "b" / "weights.safetensors").read_bytes() == store.blob_path(info.sha256).read_bytes()


def test_download_is_cut_at_the_manifest_size(home, tmp_path):
    store = hub.Store(tmp_path / "server")
    info = hub.push(make_package(tmp_path / "p"), "alice/m@1.0.0", hub=store)
    client = RemoteHub("http://127.0.0.1:1", cache=tmp_path / "cache")
    lying = hub.VersionInfo(**{**info.to_dict(), "files": {
        **info.files, "weights.safetensors": {**info.files["weights.safetensors"], "size": 100}}})
    client.show = lambda ref: lying
    streamed = []

    def endless(sha):
        while True:
            streamed.append(1 << 16)
            yield b"\0" * (1 << 16)

    client._download = endless
    with pytest.raises(hub.TooLargeError):
        client.pull("alice/m@1.0.0", tmp_path / "out")
    assert sum(streamed) <= 1 << 17 and not (tmp_path / "out").exists()
    assert not list(client.cache.tmp.iterdir())


def test_credentials_file_stays_private(home):
    path = save_token("http://127.0.0.1:8000", "pmh_a")
    assert (path.stat().st_mode & 0o777) == 0o600 and json.loads(path.read_text())
