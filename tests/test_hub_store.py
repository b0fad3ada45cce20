"""The local store and the hub API against it: push, pull, search, lineage, yank, integrity, loading checks."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

import polymod as pm
from polymod import hub
from polymod.card import Parent
from polymod.hub.package import WEIGHTS_FILE
from tests.hosts import logits, make_batch, make_host
from tests.hub_helpers import make_package

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL


@pytest.fixture
def store(tmp_path):
    return hub.Store(tmp_path / "store")


def test_push_pull_roundtrip_gives_identical_outputs(tmp_path, store):
    pkg = make_package(tmp_path / "pkg", description="a tiny LoRA", task="sentiment", language="en")
    info = hub.push(pkg, "alice/senti@1.0.0", hub=store)
    assert info.ref == "alice/senti@1.0.0" and info.kind == "lora"
    assert info.sha256 == info.files[WEIGHTS_FILE]["sha256"]
    assert info.card["owner"] == "alice" and info.card["version"] == "1.0.0"
    out = hub.pull("alice/senti", tmp_path / "pulled", hub=store)
    assert sorted(p.name for p in out.iterdir()) == [".polymod-pull.json", "module.json", WEIGHTS_FILE]
    host_a, host_b, batch = make_host("bert"), make_host("bert"), make_batch("bert")
    a, b = pm.Modular(host_a), pm.Modular(host_b)
    a.add("m", pm.load(pkg)), b.add("m", hub.get("alice/senti@1.0.0", host=host_b, hub=store))
    a.use("m"), b.use("m")
    assert torch.equal(logits(host_a, batch), logits(host_b, batch))


def test_versions_are_immutable_semver_ordered_and_deduplicated(tmp_path, store):
    p1, p2 = make_package(tmp_path / "a", seed=1), make_package(tmp_path / "b", seed=2)
    for v in ("1.0.0", "1.10.0", "1.2.0", "2.0.0-rc.1"):
        hub.push(p1 if v != "1.10.0" else p2, f"alice/m@{v}", hub=store)
    assert [v.version for v in hub.versions("alice/m", hub=store)] == ["2.0.0-rc.1", "1.10.0", "1.2.0", "1.0.0"]
    assert hub.show("alice/m", hub=store).version == "1.10.0", "latest prefers releases over pre-releases"
    assert hub.push(p1, "alice/m@1.0.0", hub=store).version == "1.0.0", "identical re-push is a no-op"
    with pytest.raises(hub.ConflictError, match="immutable"):
        hub.push(p2, "alice/m@1.0.0", hub=store)
    blobs = list(store.blobs.glob("*/*"))
    assert len(blobs) == 2 + 4, "two weight files stored once each, plus one card per version"


def test_search_full_text_and_facets(tmp_path, store):
    hub.push(make_package(tmp_path / "a", description="sentiment of movie reviews", task="sentiment",
                          language="en", tags=["movies"]), "alice/reviews@1.0.0", hub=store)
    hub.push(make_package(tmp_path / "b", family="gpt2", description="Spanish news topics", task="topic",
                          language="es", tags=["news"]), "bob/noticias@0.1.0", hub=store)
    assert [h["name"] for h in hub.search("movie", hub=store).hits] == ["reviews"]
    assert [h["name"] for h in hub.search("spani", hub=store).hits] == ["noticias"], "prefix match"
    assert hub.search("", hub=store, language="es").total == 1
    assert hub.search("", hub=store, architecture="GPT2LMHeadModel").hits[0]["owner"] == "bob"
    assert hub.search("", hub=store, tag="movies", kind="lora").total == 1
    assert hub.search("", hub=store, tag="movies", task="topic").total == 0
    facets = hub.search("", hub=store).facets
    assert facets["language"] == {"en": 1, "es": 1} and facets["kind"] == {"lora": 2}
    assert hub.search('"); DROP TABLE versions; --', hub=store).total == 0
    assert hub.search("", hub=store).total == 2


def test_yank_hides_from_latest_and_search_but_exact_pull_works(tmp_path, store):
    pkg = make_package(tmp_path / "a")
    hub.push(pkg, "alice/m@1.0.0", hub=store), hub.push(pkg, "alice/m@1.1.0", hub=store)
    hub.yank("alice/m@1.1.0", "broken metrics", hub=store)
    assert hub.show("alice/m", hub=store).version == "1.0.0"
    assert hub.search("", hub=store).hits[0]["version"] == "1.0.0"
    assert hub.show("alice/m@1.1.0", hub=store).yank_reason == "broken metrics"
    assert hub.pull("alice/m@1.1.0", tmp_path / "x", hub=store).is_dir()
    hub.yank("alice/m@1.0.0", hub=store)
    with pytest.raises(hub.NotFoundError, match="all yanked"):
        hub.show("alice/m", hub=store)
    hub.yank("alice/m@1.1.0", hub=store, undo=True)
    assert hub.show("alice/m", hub=store).version == "1.1.0"


def test_lineage_ancestors_and_descendants_by_content_hash(tmp_path, store):
    a = hub.push(make_package(tmp_path / "a", seed=1), "alice/a@1.0.0", hub=store)
    b = hub.push(make_package(tmp_path / "b", seed=2), "bob/b@2.1.0", hub=store)
    parents = [Parent("renamed-elsewhere", "9.9.9", a.sha256, 0.5), Parent("bob/b", "2.1.0", None, 0.5)]
    from polymod.card import Lineage

    merged = make_package(tmp_path / "ab", seed=3, lineage=Lineage(parents, {"method": "ties", "density": 0.2}))
    hub.push(merged, "carol/ab@1.0.0", hub=store)
    child = make_package(tmp_path / "c", seed=4, lineage=Lineage([Parent("ab", "1.0.0")], {"method": "finetune"}))
    hub.push(child, "carol/abc@1.0.0", hub=store)
    graph = hub.lineage("carol/ab@1.0.0", hub=store)
    roles = {n["id"]: n["role"] for n in graph["nodes"]}
    assert roles == {"carol/ab@1.0.0": "self", "alice/a@1.0.0": "ancestor", "bob/b@2.1.0": "ancestor",
                     "carol/abc@1.0.0": "descendant"}
    edges = {(e["parent"], e["child"]): e["weight"] for e in graph["edges"]}
    assert edges[("alice/a@1.0.0", "carol/ab@1.0.0")] == 0.5 and ("carol/ab@1.0.0", "carol/abc@1.0.0") in edges
    assert {n["id"] for n in hub.lineage("alice/a@1.0.0", hub=store)["nodes"]} >= {"carol/abc@1.0.0"}
    assert b.sha256 != a.sha256


def test_unknown_parent_stays_as_external_node(tmp_path, store):
    from polymod.card import Lineage

    pkg = make_package(tmp_path / "a", lineage=Lineage([Parent("x/y", "1.0.0", "0" * 64)], {"method": "merge"}))
    hub.push(pkg, "alice/a@1.0.0", hub=store)
    nodes = {n["id"]: n for n in hub.lineage("alice/a", hub=store)["nodes"]}
    assert nodes["x/y@1.0.0"]["in_hub"] is False


def _publish_raw(store, tmp_path, weights: bytes):
    pkg = make_package(tmp_path / "a")
    (pkg / WEIGHTS_FILE).write_bytes(weights)
    return hub.push(pkg, "alice/bad@1.0.0", hub=store)


def test_push_rejects_pickle_truncated_and_foreign_files(tmp_path, store):
    pkg = make_package(tmp_path / "a")
    good = (pkg / WEIGHTS_FILE).read_bytes()
    with pytest.raises(hub.IntegrityError, match="pickle"):
        _publish_raw(store, tmp_path, b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(hub.IntegrityError, match="truncated"):
        _publish_raw(store, tmp_path, good[:-10])
    (pkg / "evil.py").write_text("print('hi')")
    with pytest.raises(pm.FormatError, match="may not contain"):
        hub.push(pkg, "alice/m@1.0.0", hub=store)
    assert hub.search("", hub=store).total == 0, "nothing published"


@pytest.mark.parametrize("damage", ["flip", "truncate", "pickle"])
def test_pull_detects_tampered_store(tmp_path, store, damage):
    info = hub.push(make_package(tmp_path / "a"), "alice/m@1.0.0", hub=store)
    blob = store.blob_path(info.files[WEIGHTS_FILE]["sha256"])
    raw = bytearray(blob.read_bytes())
    if damage == "flip":
        raw[-1] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"\x80\x04" + bytes(len(raw) - 2))
    blob.chmod(0o644)
    blob.write_bytes(bytes(raw))
    dest = tmp_path / "out"
    with pytest.raises(hub.IntegrityError, match="corrupt or tampered"):
        hub.pull("alice/m@1.0.0", dest, hub=store)
    assert not dest.exists() and not list(tmp_path.glob(".out.*")), "nothing half-written"
    assert any("corrupt" in p for p in store.check())


def test_loading_checks_error_and_warning(tmp_path, store):
    hub.push(make_package(tmp_path / "a"), "alice/m@1.0.0", hub=store)
    with pytest.raises(pm.IncompatibleHostError, match="sites are missing.*architecture: module made for Bert"):
        hub.get("alice/m", host=make_host("gpt2"), hub=store)
    other = make_host("bert", seed=5)
    with pytest.warns(pm.HostMismatchWarning, match="host weights differ at 4 of 4 sites"):
        hub.get("alice/m", host=other, hub=store)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hub.get("alice/m", host=make_host("bert"), hub=store)


def test_loading_check_names_geometry_difference(tmp_path, store):
    import transformers as tf

    hub.push(make_package(tmp_path / "a"), "alice/m@1.0.0", hub=store)
    cfg = tf.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        vocab_size=96, max_position_embeddings=64, num_labels=3)
    with pytest.raises(pm.IncompatibleHostError, match=r"expects a linear 32->32, host has a linear 48->48"):
        hub.get("alice/m", host=tf.BertForSequenceClassification(cfg), hub=store)


def test_store_check_and_gc(tmp_path, store):
    hub.push(make_package(tmp_path / "a"), "alice/m@1.0.0", hub=store)
    assert store.check() == []
    sha, _ = store.write_blob([b"orphan"])
    assert store.gc(older_than=0) == 1 and not store.has_blob(sha)
    assert store.check() == []


def test_push_needs_a_version(tmp_path, store):
    with pytest.raises(hub.InvalidNameError, match="no version"):
        hub.push(make_package(tmp_path / "a"), "alice/m", hub=store)
    card = json.loads((tmp_path / "a" / "module.json").read_text())
    assert card["version"] is None


def test_default_store_location_follows_polymod_home(tmp_path, monkeypatch, hub_backend):
    monkeypatch.setenv("POLYMOD_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("POLYMOD_HUB", raising=False)
    hub.push(make_package(tmp_path / "a"), "alice/m@1.0.0")
    recorded = "index.sqlite" if hub_backend == "sqlite" else "database.json"
    assert (tmp_path / "home" / "hub" / recorded).is_file()
    assert hub.show("alice/m").version == "1.0.0"


def test_safetensors_without_card_entries_is_rejected(tmp_path, store):
    pkg = make_package(tmp_path / "a")
    save_file({"x": torch.zeros(2)}, str(pkg / WEIGHTS_FILE))
    hub.push(pkg, "alice/m@1.0.0", hub=store)  # structurally valid safetensors: the store accepts it
    with pytest.raises(pm.FormatError, match="does not match its card"):
        pm.load(hub.pull("alice/m@1.0.0", hub=store))


def test_concurrent_local_pushes_are_all_present(tmp_path, store):
    import concurrent.futures as cf

    packages = [make_package(tmp_path / f"p{i}", seed=i) for i in range(3)]
    jobs = [(packages[i % 3], f"alice/m{i % 4}@1.{i}.0") for i in range(12)]
    with cf.ThreadPoolExecutor(8) as pool:
        refs = list(pool.map(lambda job: hub.push(job[0], job[1], hub=hub.Store(store.root)).ref, jobs))
    assert sorted(refs) == sorted(r for _, r in jobs) and store.check() == []
    assert sum(len(hub.versions(f"alice/m{i}", hub=store)) for i in range(4)) == 12


def test_composition_package_push_pull_attach(tmp_path, store):
    from polymod.hub.composition import CompositionPackage, save_composition

    a = hub.push(make_package(tmp_path / "a", seed=1), "alice/en@1.0.0", hub=store)
    hub.push(make_package(tmp_path / "b", seed=2), "bob/senti@2.1.0", hub=store)
    path = save_composition(pm.Stack("en", "senti"), {"en": "alice/en@1.0.0", "senti": "bob/senti@2.1.0"},
                            tmp_path / "comp", hub=store, description="English then sentiment")
    info = hub.push(path, "carol/en-senti@1.0.0", hub=store)
    assert info.kind == "composition" and set(info.files) == {"module.json"}
    roles = {n["id"]: n["role"] for n in hub.lineage("alice/en@1.0.0", hub=store)["nodes"]}
    assert roles["carol/en-senti@1.0.0"] == "descendant"
    package = pm.load(hub.pull("carol/en-senti", hub=store))
    assert isinstance(package, CompositionPackage) and package.modules["en"].module == "alice/en"
    host, reference, batch = make_host("bert"), make_host("bert"), make_batch("bert")
    model = pm.Modular(host)
    package.attach(model, hub=store)
    assert model.names() == ["en", "senti"] and model.active == pm.Stack("en", "senti")
    manual = pm.Modular(reference)
    manual.add("en", pm.load(tmp_path / "a")), manual.add("senti", pm.load(tmp_path / "b"))
    manual.use(pm.Stack("en", "senti"))
    assert torch.equal(logits(host, batch), logits(reference, batch))
    assert a.sha256 == package.card.lineage.parents[0].sha256


def test_pull_refuses_hostile_file_names(tmp_path, store):
    from polymod.hub.client import materialize

    info = hub.push(make_package(tmp_path / "a"), "alice/m@1.0.0", hub=store)
    evil = hub.VersionInfo(**{**info.to_dict(), "files": {**info.files, "../../escape.txt": info.files["module.json"]}})
    with pytest.raises(hub.IntegrityError, match="only"):
        materialize(evil, store.iter_blob, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out").exists()
    with pytest.raises(hub.InvalidNameError):
        materialize(hub.VersionInfo(**{**info.to_dict(), "name": ".."}), store.iter_blob, tmp_path / "out")
