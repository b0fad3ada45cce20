"""PEFT users' loading and unloading habits (issue 14, item 4): from_pretrained in one line, disable(),
merge_and_unload() distinct from detach(), save_all / load_all with the active composition."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import polymod as pm
from polymod.modular import wrapper_of
from tests.hosts import assert_same_state, host_state, make_batch, make_host


def _trained(seed=0, sites="attn.q|attn.v"):
    """A BERT host with LoRA 'a' (non-zero B, so it changes outputs), active."""
    host = make_host("bert")
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=2, sites=sites))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model["a"].parameters():
            p.normal_(0, 0.2)
    model.use("a")
    return host, model


def _logits(host, batch):
    with torch.no_grad():
        return host(**batch).logits


def test_from_pretrained_one_line_for_a_saved_module(tmp_path):
    host, model = _trained()
    batch = make_batch("bert")
    expected = _logits(host, batch)
    pm.save(model["a"], tmp_path / "a")
    fresh = make_host("bert")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same pretrained weights: no HostMismatchWarning
        ready = pm.from_pretrained(fresh, tmp_path / "a")
    assert ready.names() == ["a"] and ready.active == "a" and wrapper_of(fresh) is ready
    assert torch.equal(_logits(fresh, batch), expected)
    again = pm.from_pretrained(fresh, tmp_path / "a", name="b", use=False)  # a wrapped host keeps its wrapper
    assert again is ready and ready.names() == ["a", "b"] and ready.active == "a"
    with pytest.raises(pm.IncompatibleHostError, match="does not fit this host"):
        pm.from_pretrained(make_host("gpt2"), tmp_path / "a")


@pytest.mark.slow  # a second Python process imports torch and transformers (~20 s on a busy machine)
def test_from_pretrained_in_a_fresh_process(tmp_path):
    host, model = _trained()
    pm.save(model["a"], tmp_path / "a")
    torch.save(_logits(host, make_batch("bert")), tmp_path / "expected.pt")
    script = (
        "import sys, warnings, torch; warnings.simplefilter('error')\n"
        "import polymod as pm\n"
        "from tests.hosts import make_batch, make_host\n"
        "host = make_host('bert')\n"
        f"pm.from_pretrained(host, {str(tmp_path / 'a')!r})\n"
        "with torch.no_grad(): out = host(**make_batch('bert')).logits\n"
        f"assert torch.equal(out, torch.load({str(tmp_path / 'expected.pt')!r})), 'outputs differ'\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=str(__import__("pathlib").Path(__file__).parent.parent))
    assert done.returncode == 0, done.stderr[-2000:]


def test_from_pretrained_refuses_what_is_neither_a_directory_nor_a_reference(tmp_path):
    with pytest.raises(pm.PolymodError, match="expected 'owner/name' or 'owner/name@version'"):
        pm.from_pretrained(make_host("bert"), str(tmp_path / "missing" / "dir"))


def test_disable_runs_the_bare_host_and_restores_the_composition():
    host, model = _trained()
    batch = make_batch("bert")
    bare = _logits(host, batch)
    model.use(None)
    bare = _logits(host, batch)
    model.use("a")
    with_module = _logits(host, batch)
    assert not torch.equal(bare, with_module)
    with model.disable():
        assert torch.equal(_logits(host, batch), bare) and model.active is None
    assert model.active == "a" and torch.equal(_logits(host, batch), with_module)
    with pytest.raises(RuntimeError), model.disable():  # restored on errors too
        raise RuntimeError
    assert torch.equal(_logits(host, batch), with_module)
    model.merge_into_host("a")
    with pytest.raises(pm.StateError, match=r"merged into the host weights.*model.unmerge"), model.disable():
        pass


def test_merge_and_unload_keeps_the_merged_host_unlike_detach():
    batch = make_batch("bert")
    host, model = _trained()
    original = host_state(make_host("bert"))
    with_module = _logits(host, batch)
    returned = model.merge_and_unload()
    assert returned is host and wrapper_of(host) is None and len(model.names()) == 0
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in host.modules())
    torch.testing.assert_close(_logits(host, batch), with_module, rtol=1e-5, atol=1e-5)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(host.state_dict()[query], original[query])  # the delta stays in the weights
    pm.Modular(host)  # the host is free to wrap again

    host2, model2 = _trained()
    model2.detach()  # detach: the original host, bit for bit
    assert_same_state(host2, original)

    host3, model3 = _trained()
    model3.add("b", pm.LoRA(rank=2))
    model3.use(pm.Stack("a", "b"))
    with pytest.raises(pm.StateError, match=r"name the modules: merge_and_unload\(\['a', 'b'\]\)"):
        model3.merge_and_unload()


def test_save_all_and_load_all_keep_every_module_and_the_composition(tmp_path):
    host, model = _trained()
    model.add("b", pm.LoRA(rank=3, sites="attn.v"))
    with torch.no_grad():
        for p in model["b"].parameters():
            p.normal_(0, 0.2)
    model.use(pm.Stack("a", "b"))
    batch = make_batch("bert")
    expected = _logits(host, batch)
    pm.save_all(model, tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["a", "b", "composition.json"]
    fresh = make_host("bert")
    ready = pm.from_pretrained(fresh, tmp_path / "model")  # a model directory: every module + composition
    assert ready.names() == ["a", "b"] and ready.active == pm.Stack("a", "b")
    assert torch.equal(_logits(fresh, batch), expected)
    other = pm.Modular(make_host("bert"))
    assert pm.load_all(other, tmp_path / "model", use=False) == ["a", "b"] and other.active is None
    (tmp_path / "model" / "composition.json").write_text('{"format": "something-else"}')
    with pytest.raises(pm.FormatError, match="is not a polymod model index"):
        pm.load_all(pm.Modular(make_host("bert")), tmp_path / "model")
