"""Libraries from the hub and derived artifacts: computed once, reused, recomputed when missing, with lineage."""

from __future__ import annotations

import hashlib

import pytest
import torch

import polymod as pm
from polymod import assets, format
from polymod.hub.derived import DerivedStore, artifact_key
from polymod.hub.library import ARROW, CENTROID
from tests.hosts import logits, make_batch, make_host, randomize

pytestmark = pytest.mark.usefixtures("hub_backend")  # each test on SQLite and on PostgreSQL


def _publish(hub, family="llama", spec=None, names=("a", "b", "c"), owner="alice", tags=("lib",)):
    host = make_host(family)
    model = pm.Modular(host)
    for i, name in enumerate(names):
        model.add(name, spec() if spec else pm.LoRA(rank=2 + i, sites="*.q_proj|*.v_proj"))
        torch.manual_seed(i)
        randomize(model[name], 0.3)
        model[name].card.tags = list(tags)
        model[name].card.task = name
        pm.hub.push(pm.save(model[name], hub.parent / f"pkg-{owner}-{name}"), f"{owner}/{name}@1.0.0", hub=hub)
    model.detach()
    return host


def test_library_by_query_and_refs(tmp_path):
    hub = tmp_path / "hub"
    host = _publish(hub)
    lib = pm.hub.library("", host=host, hub=hub, tag="lib")
    assert sorted(lib) == ["a", "b", "c"] and lib.refs["a"] == "alice/a@1.0.0"
    by_ref = pm.hub.library(["alice/b", "alice/a@1.0.0"], host=host, hub=hub)
    assert list(by_ref) == ["b", "a"]
    with pytest.raises(pm.ConfigError, match="no module in .* matches 'nothing-like-this'"):
        pm.hub.library("nothing-like-this", host=host, hub=hub)
    with pytest.raises(pm.ConfigError, match="apply to a search query"):
        pm.hub.library(["alice/a"], host=host, hub=hub, kind="lora")
    with pytest.raises(pm.IncompatibleHostError):
        pm.hub.library(["alice/a"], host=make_host("bert"), hub=hub)  # fingerprint-checked against the host


def test_arrow_prototypes_are_computed_once_reused_and_recomputed_when_missing(tmp_path):
    hub = tmp_path / "hub"
    host = _publish(hub)
    lib = pm.hub.library(["alice/a", "alice/b", "alice/c"], host=host, hub=hub)
    first = lib.prototypes()
    assert sorted(lib.computed) == [("a", ARROW), ("b", ARROW), ("c", ARROW)]
    again = pm.hub.library(["alice/a", "alice/b", "alice/c"], host=host, hub=hub)
    second = again.prototypes()
    assert again.computed == [], "stored artifacts must be read back, not recomputed"
    for name in first:
        for site in first[name]:
            assert torch.equal(first[name][site], second[name][site])
    # lineage: each artifact names the module version and content hash it was derived from
    info = again.artifacts("a")
    assert len(info) == 1 and info[0].parent == "alice/a@1.0.0" and info[0].transform == ARROW
    assert info[0].module_sha == format.content_hash(again["a"])
    assert info[0].key == artifact_key(info[0].module_sha, ARROW, {"method": "svd-top1"})
    # gc keeps derived blobs; a deleted blob is recomputed on next use
    store = pm.hub.Store(hub)
    assert store.gc(older_than=0) == 0 and store.has_blob(info[0].sha256)
    store.blob_path(info[0].sha256).unlink()
    third = pm.hub.library(["alice/a"], host=host, hub=hub)
    third.prototypes()
    assert third.computed == [("a", ARROW)]
    assert store.has_blob(third.artifacts("a")[0].sha256)


def test_corrupt_artifact_is_refused(tmp_path):
    store = DerivedStore(tmp_path / "hub")
    info = store.put("0" * 64, "t", {"x": 1}, {"v": torch.ones(3)}, parent="a/b@1.0.0")
    path = store.store.blob_path(info.sha256)
    path.chmod(0o644)
    path.write_bytes(path.read_bytes()[:-1] + b"\0")
    with pytest.raises(pm.hub.IntegrityError, match="is corrupt"):
        store.load(info)
    assert store.find("0" * 64, "t", {"x": 2}) is None  # another config is another artifact
    with pytest.raises(pm.ConfigError, match="must be JSON"):
        store.find("0" * 64, "t", {"x": object()})


def test_library_arrow_equals_arrow_deriving_its_own_prototypes(tmp_path):
    hub = tmp_path / "hub"
    host = _publish(hub)
    lib = pm.hub.library(["alice/a", "alice/b", "alice/c"], host=host, hub=hub)
    model = pm.Modular(host)
    assert lib.attach(model) == ["a", "b", "c"]
    batch = make_batch("llama")
    model.use(lib.mix(lib.arrow(top_k=2)))
    from_hub = logits(host, batch)
    model.use(pm.Mix(["a", "b", "c"], router=pm.Arrow(top_k=2)))
    torch.testing.assert_close(from_hub, logits(host, batch), rtol=0, atol=1e-6)


def test_ia3_prototypes_are_keyed_by_the_host_weights(tmp_path):
    hub = tmp_path / "hub"
    host = _publish(hub, spec=lambda: pm.IA3(sites="*.k_proj|*.v_proj"), names=("x", "y"))
    lib = pm.hub.library(["alice/x", "alice/y"], host=host, hub=hub)
    lib.prototypes()
    config = lib.artifacts("x")[0].config
    assert set(config) == {"method", "host"}  # IA³'s ΔW = diag(l − 1) W reads the host weight


class BagOfWords:
    """A tiny deterministic sentence encoder: each word a fixed random vector, a text their sum."""

    name = "bag-of-words-16"

    def __call__(self, texts):
        out = []
        for text in texts:
            vec = torch.zeros(16)
            for word in text.lower().split():
                seed = int(hashlib.sha256(word.encode()).hexdigest()[:8], 16)
                vec += torch.randn(16, generator=torch.Generator().manual_seed(seed))
            out.append(vec)
        return torch.stack(out)


EXAMPLES = {"a": ["the film was great fun", "a great film"], "b": ["stocks fell on the market", "market news"],
            "c": ["the team won the match", "a football match"]}


def test_retrieval_centroids_stored_and_reused_and_routing_per_request(tmp_path):
    hub = tmp_path / "hub"
    host = _publish(hub)
    lib = pm.hub.library(["alice/a", "alice/b", "alice/c"], host=host, hub=hub)
    enc = BagOfWords()
    with pytest.raises(pm.StateError, match="has no retrieval centroid .* pass examples="):
        lib.retrieval(enc)
    router = lib.retrieval(enc, top_k=1, examples=EXAMPLES)
    assert sorted(lib.computed) == [("a", CENTROID), ("b", CENTROID), ("c", CENTROID)]
    again = pm.hub.library(["alice/a", "alice/b", "alice/c"], host=host, hub=hub)
    reused = again.retrieval(enc, top_k=1)  # no examples: the stored centroids
    assert again.computed == []
    texts = ["great fun film", "the market fell", "who won the match"]
    assert router.select(texts, ["a", "b", "c"]) == [["a"], ["b"], ["c"]]
    assert reused.select(texts, ["a", "b", "c"]) == [["a"], ["b"], ["c"]]
    model = pm.Modular(host)
    lib.attach(model)
    model.use(lib.mix(router))
    batch = make_batch("llama", batch=3)
    with router.requests(texts):
        routed = logits(host, batch)
    for row, name in enumerate("abc"):  # top-1 retrieval equals running each row with its module alone
        model.use(name)
        alone = logits(host, {k: v[row:row + 1] for k, v in batch.items()})
        torch.testing.assert_close(routed[row:row + 1], alone, rtol=0, atol=1e-5)


def test_retrieval_top2_averages_outputs_or_parameters():
    host = make_host("llama")
    model = pm.Modular(host)
    for name in "abc":
        model.add(name, pm.LoRA(rank=2, sites="*.q_proj"))
        randomize(model[name], 0.3)
    enc = BagOfWords()
    router = pm.Retrieval(top_k=2, encoder=enc)
    router.provide_all({n: pm.routing.centroid(enc, t) for n, t in EXAMPLES.items()})
    model.use(pm.Mix(["a", "b", "c"], router=router))
    batch = make_batch("llama", batch=2)
    texts = ["great fun film", "the market fell"]
    picks = router.select(texts)
    with router.requests(texts):
        out = logits(host, batch)
        w = router.weights(model.routing.inputs, None, None, torch.zeros(2, 1))
    assert torch.equal((w > 0).sum(-1), torch.tensor([2, 2])) and torch.allclose(w.sum(-1), torch.ones(2))
    for row, pair in enumerate(picks):  # output average of the two retrieved modules
        single = {k: v[row:row + 1] for k, v in batch.items()}
        model.use(pm.Mix(pair))
        torch.testing.assert_close(out[row:row + 1], logits(host, single), rtol=0, atol=1e-5)
    fused = pm.Retrieval(top_k=2, encoder=enc)
    fused.provide_all({n: pm.routing.centroid(enc, t) for n, t in EXAMPLES.items()})
    model.use(pm.Mix(["a", "b", "c"], router=fused, aggregate="delta"))  # parameter average per row
    with fused.requests(texts):
        merged = logits(host, batch)
    torch.testing.assert_close(merged, out, rtol=0, atol=1e-5)  # LoRA is linear in x: same function


def test_retrieval_errors():
    model = pm.Modular(make_host("llama"))
    model.add("a", pm.LoRA(rank=2))
    model.add("b", pm.LoRA(rank=2))
    router = pm.Retrieval(top_k=1, encoder=BagOfWords())
    with pytest.raises(pm.CompositionError, match="has no centroid for a, b"):
        model.use(pm.Mix(["a", "b"], router=router))
    router.provide_all({n: pm.routing.centroid(BagOfWords(), t) for n, t in EXAMPLES.items()})
    model.use(pm.Mix(["a", "b"], router=router))
    batch = make_batch("llama", batch=2)
    with pytest.raises(pm.StateError, match="run the host inside `with router.requests"):
        logits(model.host, batch)
    with router.requests(["one text"]), pytest.raises(pm.StateError, match="1 request texts for a batch of 2"):
        logits(model.host, batch)
    with pytest.raises(pm.ConfigError, match="top_k must be a positive integer"):
        pm.Retrieval(top_k=0)
    with pytest.raises(pm.StateError, match="no sentence encoder"):
        pm.Retrieval().scores(["x"], [])
    with pytest.raises(pm.ConfigError, match="at least one example text"):
        pm.routing.centroid(BagOfWords(), [])


@pytest.mark.slow
def test_minilm_sentence_encoder_retrieves_by_topic():
    enc = pm.routing.SentenceEncoder.from_pretrained(assets.minilm_path())
    router = pm.Retrieval(top_k=1, encoder=enc)
    router.provide_all({n: pm.routing.centroid(enc, t) for n, t in EXAMPLES.items()})
    assert router.select(["an entertaining movie", "shares dropped sharply", "the striker scored"],
                         ["a", "b", "c"]) == [["a"], ["b"], ["c"]]
