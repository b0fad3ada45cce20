"""Derived artifacts over HTTP: stored in the hub beside the module, pulled with it, pushed on first use."""

from __future__ import annotations

import hashlib

import httpx
import pytest
import torch
from safetensors.torch import save as save_safetensors

import polymod as pm
from polymod import format
from polymod.hub.auth import create_token
from polymod.hub.derived import DerivedStore, artifact_key
from polymod.hub.library import ARROW, GATES
from polymod.hub.remote import RemoteHub
from tests.hosts import make_host, randomize
from tests.hub_helpers import hub_thread

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL

REFS = ["alice/a@1.0.0", "alice/b@1.0.0", "alice/c@1.0.0"]


@pytest.fixture
def hub(tmp_path):
    """A hub on loopback holding three LoRAs of different ranks by alice; yields (url, store, tokens, host)."""
    store_dir = tmp_path / "store"
    host = make_host("llama")
    model = pm.Modular(host)
    for i, ref in enumerate(REFS):
        name = ref.split("/")[1].split("@")[0]
        model.add(name, pm.LoRA(rank=2 + i, sites="*.q_proj|*.v_proj"))
        torch.manual_seed(i)
        randomize(model[name], 0.3)
        pm.hub.push(pm.save(model[name], tmp_path / f"pkg-{name}"), ref, hub=store_dir)
    model.detach()
    store = pm.hub.Store(store_dir)
    tokens = {"alice": create_token(store, "alice"), "bob": create_token(store, "bob")}
    with hub_thread(store) as url:
        yield url, store, tokens, host


def _client(url, token, tmp_path, name):
    return RemoteHub(url, token, cache=tmp_path / name)


def test_artifacts_computed_by_one_user_are_pulled_by_the_next(tmp_path, hub):
    url, store, tokens, host = hub
    alice = pm.hub.library(REFS[:2], host=host, hub=_client(url, tokens["alice"], tmp_path, "alice"))
    first = alice.prototypes()
    assert sorted(alice.computed) == [("a", ARROW), ("b", ARROW)]
    assert len(alice.derived.pushed) == 2 and alice.derived.not_pushed == {}
    on_hub = DerivedStore(store).of_module(format.content_hash(alice["a"]))
    assert [(i.transform, i.parent) for i in on_hub] == [(ARROW, "alice/a@1.0.0")]  # lineage to the version
    assert store.has_blob(on_hub[0].sha256)

    anonymous = pm.hub.library(REFS[:2], host=host, hub=_client(url, None, tmp_path, "anon"))
    second = anonymous.prototypes()
    assert anonymous.computed == [], "the hub's artifacts must be pulled, not recomputed"
    for name in first:
        for site in first[name]:
            assert torch.equal(first[name][site], second[name][site])
    # pulled once: the cache now answers even for a lookup the hub is not asked about
    cached = DerivedStore(tmp_path / "anon").of_module(format.content_hash(anonymous["a"]))
    assert [i.key for i in cached] == [on_hub[0].key]

    # a user without a token computes what the hub lacks and keeps it locally
    c = pm.hub.library(["alice/c"], host=host, hub=_client(url, None, tmp_path, "anon2"))
    c.prototypes()
    assert c.computed == [("c", ARROW)]
    assert list(c.derived.not_pushed.values()) == [f"no token for {url}: kept in the local cache only"]
    assert DerivedStore(store).of_module(format.content_hash(c["c"])) == []
    again = pm.hub.library(["alice/c"], host=host, hub=_client(url, None, tmp_path, "anon2"))
    again.prototypes()
    assert again.computed == [], "a locally cached artifact is reused"


def test_gates_published_with_a_token_route_for_another_user(tmp_path, hub):
    url, store, tokens, host = hub
    bob = pm.hub.library(REFS, host=host, hub=_client(url, tokens["bob"], tmp_path, "bob"))
    for i, name in enumerate(bob):
        gates = {site: torch.full((16,), float(i)) for site in bob[name].sites}
        bob.store_gates(name, gates, {"steps": 100, "lr": 1e-3, "data": name})
    assert len(bob.derived.pushed) == 3  # any user with a token may contribute an artifact
    other = pm.hub.library(REFS, host=host, hub=_client(url, None, tmp_path, "other"))
    router = other.phatgoose(top_k=2)
    assert [i.transform for i in other.artifacts("c")] == [GATES]
    assert torch.equal(router._gates["c"][next(iter(other["c"].sites))], torch.full((16,), 2.0))


def _blob(transform, module_sha, value=1.0) -> bytes:
    return save_safetensors({"v": torch.full((4,), value)}, metadata={"transform": transform,
                                                                      "module_sha256": module_sha})


def test_registering_checks_token_lineage_and_blob(hub):
    url, store, tokens, _ = hub
    sha_a, sha_b = store.get("alice", "a").sha256, store.get("alice", "b").sha256
    auth = {"Authorization": f"Bearer {tokens['bob']}"}
    http = httpx.Client(base_url=url + "/api/v1", headers=auth)

    def upload(data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        assert http.put(f"/blobs/{sha}", content=data).status_code == 201
        return sha

    good = upload(_blob("t", sha_a))
    body = {"transform": "t", "config": {"k": 1}, "sha256": good, "parent": "alice/a@1.0.0"}
    r = httpx.post(f"{url}/api/v1/derived/{sha_a}", json=body)
    assert r.status_code == 401
    r = http.post(f"/derived/{sha_b}", json=body)  # the parent's content hash is not the module's
    assert r.status_code == 409 and "must be the module version it was computed from" in r.json()["detail"]
    r = http.post(f"/derived/{sha_a}", json={**body, "sha256": "e" * 64})
    assert r.status_code == 404 and "upload the artifact's tensors" in r.json()["detail"]
    wrong = upload(_blob("other", sha_a))
    r = http.post(f"/derived/{sha_a}", json={**body, "sha256": wrong})
    assert r.status_code == 422 and "was written for transform 'other'" in r.json()["detail"]
    not_st = upload(b"not safetensors at all")
    r = http.post(f"/derived/{sha_a}", json={**body, "sha256": not_st})
    assert r.status_code == 422 and "is not a safetensors file" in r.json()["detail"]
    r = http.post(f"/derived/{sha_a}", json=body)
    assert r.status_code == 201 and r.json()["key"] == artifact_key(sha_a, "t", {"k": 1})
    assert http.post(f"/derived/{sha_a}", json=body).json()["created"] == r.json()["created"]  # idempotent
    other = upload(_blob("t", sha_a, 2.0))
    r = http.post(f"/derived/{sha_a}", json={**body, "sha256": other})
    assert r.status_code == 409 and "already stored" in r.json()["detail"]
    assert http.get(f"/derived/{sha_a}/{artifact_key(sha_a, 't', {'k': 1})}").json()["sha256"] == good
    assert http.get(f"/derived/{sha_a}/{'0' * 64}").status_code == 404
    assert [d["sha256"] for d in http.get(f"/derived/{sha_a}").json()] == [good]


def test_tampered_artifact_on_the_hub_is_refused_and_a_lost_one_recomputed(tmp_path, hub):
    url, store, tokens, host = hub
    alice = pm.hub.library(REFS[:1], host=host, hub=_client(url, tokens["alice"], tmp_path, "alice"))
    alice.prototypes()
    info = DerivedStore(store).of_module(format.content_hash(alice["a"]))[0]
    path = store.blob_path(info.sha256)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    fresh = pm.hub.library(REFS[:1], host=host, hub=_client(url, None, tmp_path, "fresh"))
    with pytest.raises(pm.hub.IntegrityError):
        fresh.prototypes()
    assert not DerivedStore(tmp_path / "fresh").store.has_blob(info.sha256)  # nothing unverified is kept
    path.unlink()  # the hub lost the blob: the next user with a token recomputes and re-registers it
    bob = pm.hub.library(REFS[:1], host=host, hub=_client(url, tokens["bob"], tmp_path, "bob"))
    bob.prototypes()
    assert bob.computed == [("a", ARROW)] and len(bob.derived.pushed) == 1
    replaced = DerivedStore(store).by_key(info.key)  # the record now points at the new upload
    assert replaced is not None and store.has_blob(replaced.sha256) and replaced.key in bob.derived.pushed
