"""The invariant matrix of STYLE.md: every module kind × every tiny host family."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from tests.hosts import FAMILIES, assert_same_state, host_state, logits, make_batch, make_host, randomize
from tests.kinds import KINDS

CASES = [(k, f) for k in KINDS for f in FAMILIES]


def _setup(kind: str, family: str):
    factory, identity = KINDS[kind]
    spec = factory(family)
    if spec is None:
        pytest.skip(f"{kind} does not apply to {family}")
    host = make_host(family)
    return host, spec, identity


def _tied(model: pm.Modular, name: str) -> bool:
    """Whether a site's weight is tied to another layer (merging is refused there)."""
    counts: dict[int, int] = {}
    for _, p in model.host.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    layers = dict(model.host.named_modules())
    return any(counts.get(id(getattr(layers[s], "weight", None)), 0) > 1 for s in model[name].sites)


@pytest.mark.parametrize("kind,family", CASES)
def test_identity_at_init_and_detach_restores(kind, family):
    host, spec, identity = _setup(kind, family)
    batch = make_batch(family)
    before, state = logits(host, batch), host_state(host)
    layers = dict(host.named_modules())
    model = pm.Modular(host)
    report = model.add("m", spec)
    assert report.sites and report.trainable_parameters == model["m"].num_parameters() > 0
    model.use("m")
    if identity:
        torch.testing.assert_close(logits(host, batch), before, rtol=0, atol=1e-6)
    randomize(model["m"])
    after = logits(host, batch)[:, -before.shape[1]:]  # prompts add leading positions: compare the tokens'
    assert not torch.allclose(after, before, atol=1e-4), "a random module must change the output"
    assert not any(p.requires_grad for p in host.parameters()), "Modular freezes the host"
    if model["m"].mergeable and not _tied(model, "m"):
        model.merge_into_host("m")
    model.detach()
    assert_same_state(host, state)
    assert all(a is b for (_, a), (_, b) in zip(host.named_modules(), layers.items()))
    assert all(p.requires_grad for p in host.parameters()), "detach restores requires_grad"
    torch.testing.assert_close(logits(host, batch), before, rtol=0, atol=0)


@pytest.mark.parametrize("kind,family", CASES)
def test_merged_equals_unmerged(kind, family):
    host, spec, _ = _setup(kind, family)
    model = pm.Modular(host)
    model.add("m", spec)
    if not model["m"].mergeable:
        pytest.skip(f"{kind} is not a parameter-composition module")
    randomize(model["m"], std=0.1)
    model.use("m")
    batch = make_batch(family)
    unmerged = logits(host, batch)
    if _tied(model, "m"):
        with pytest.raises(pm.StateError, match="shared by"):
            model.merge_into_host("m")
        return
    model.merge_into_host("m")
    torch.testing.assert_close(logits(host, batch), unmerged, rtol=1e-4, atol=1e-5)
    with pytest.raises(pm.StateError, match="already merged"):
        model.merge_into_host("m")
    model.unmerge("m")
    torch.testing.assert_close(logits(host, batch), unmerged, rtol=0, atol=0)


@pytest.mark.parametrize("kind,family", CASES)
def test_gradients_reach_only_module_parameters(kind, family):
    host, spec, _ = _setup(kind, family)
    model = pm.Modular(host)
    model.add("m", spec)
    model.add("idle", spec)
    randomize(model["m"], std=0.1)
    model.use("m")
    model.train()
    out = host(**make_batch(family)).logits
    out.float().pow(2).mean().backward()
    assert all(p.grad is None for p in host.parameters())
    grads = [p.grad for p in model["m"].parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in model["idle"].parameters()), "an inactive module must not get gradients"


@pytest.mark.parametrize("kind,family", CASES)
def test_save_load_reproduces_outputs(kind, family, tmp_path):
    host, spec, _ = _setup(kind, family)
    model = pm.Modular(host)
    model.add("m", spec)
    randomize(model["m"], std=0.1)
    model.use("m")
    batch = make_batch(family)
    expected = logits(host, batch)
    pm.save(model["m"], tmp_path / "m")
    model.use(None)
    model.add("loaded", pm.load(tmp_path / "m"))
    model.use("loaded")
    torch.testing.assert_close(logits(host, batch), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind,family", [c for c in CASES if c[1] in ("gpt2", "llama", "t5")])
def test_generate_works(kind, family):
    host, spec, _ = _setup(kind, family)
    model = pm.Modular(host)
    model.add("m", spec)
    randomize(model["m"], std=0.1)
    model.use("m")
    batch = make_batch(family, batch=2, length=5)
    batch.pop("decoder_input_ids", None)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2 and out.shape[1] >= 4
    model.use(None)
    plain = host.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == plain.shape
