"""PEFT users' habits get an error or warning that says the polymod way (issue 14, item 3)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import yaml

import polymod as pm
from polymod.errors import InactiveModuleWarning, UnknownArgumentError
from polymod.training.run_config import load_config, read_yaml
from tests.hosts import make_batch, make_host
from tests.test_train_cli import _cli, _host_dir, _write
from tests.test_train_util import classification_data, one_thread  # noqa: F401


@pytest.mark.parametrize(("kwargs", "hint"), [
    ({"r": 8}, "'r': did you mean 'rank'"),
    ({"target_modules": ["query", "value"]}, "'target_modules': did you mean 'sites'"),
    ({"lora_alpha": 16}, "'lora_alpha': did you mean 'alpha'"),
    ({"lora_dropout": 0.1}, "'lora_dropout': did you mean 'dropout'"),
    ({"modules_to_save": ["classifier"]},
     r"'modules_to_save': a trainable copy of a host layer \(a task head\) is a module of its own in polymod: "
     r"model.add\('head', pm.Head\(sites='classifier'\)\)"),
    ({"rnak": 4}, "'rnak': did you mean 'rank'"),
])
def test_peft_keywords_say_the_polymod_name(kwargs, hint):
    with pytest.raises(UnknownArgumentError, match=hint) as info:
        pm.LoRA(**kwargs)
    assert isinstance(info.value, TypeError) and isinstance(info.value, pm.ConfigError)
    assert "LoRA takes: rank, alpha, dropout" in str(info.value)
    with pytest.raises(UnknownArgumentError, match="'feedforward_modules': did you mean 'feedforward'"):
        pm.IA3(feedforward_modules=["output.dense"])
    assert pm.LoRA(rank=4).rank == 4  # real fields still work, positionally too
    assert pm.LoRA(2).rank == 2


def test_peft_keywords_in_a_training_config_are_reported(tmp_path, monkeypatch, capsys):
    _host_dir(tmp_path)
    cfg = _write(tmp_path, None)
    cfg["modules"]["t"] = {"kind": "lora", "r": 8, "target_modules": "query"}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "train.yaml"), "--check")
    message = " ".join(err.split())
    assert code == 1 and "'r': did you mean 'rank'" in message and "'target_modules': did you mean 'sites'" in message


@pytest.mark.parametrize(("sites", "hint"), [
    ("query", r"use the glob sites='\*\.query'"),
    (["query"], r"use the glob sites='\*\.query'"),
    ("query,value", r"sites='\*\.query\|\*\.value'.*joined with '\|' \(or given as a list\), not with ','"),
])
def test_a_bare_layer_name_suggests_the_glob(sites, hint):
    model = pm.Modular(make_host("bert"))
    with pytest.raises(pm.SiteNotFoundError, match=hint):
        model.add("a", pm.LoRA(sites=sites))
    assert "attn.q" not in str(pytest.raises(pm.SiteNotFoundError, model.add, "a", pm.LoRA(sites="query")).value)
    report = model.add("a", pm.LoRA(sites="*.query|*.value"))  # the suggestion works
    assert len(report.sites) == 4


def test_wrapping_a_host_twice_is_refused_until_detach():
    host = make_host("bert")
    batch = make_batch("bert")
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=2))
    with pytest.raises(pm.StateError, match=r"already wrapped by a Modular \(attached: a\).*detach\(\)"):
        pm.Modular(host)
    with pytest.raises(pm.ConfigError, match="already a Modular model; use it directly"):
        pm.Modular(model)
    with torch.no_grad():
        before = host(**batch).logits
    model.detach()
    again = pm.Modular(host)  # after detach the host is free again
    with torch.no_grad():
        assert torch.equal(host(**batch).logits, before)
    again.detach()


def test_a_module_attached_but_not_active_is_named_with_the_fix():
    host = make_host("bert").train()
    model = pm.Modular(host)
    model.add("t", pm.LoRA(rank=2))
    assert model.active is None  # adding never activates (selection state is explicit)
    batch = {**make_batch("bert"), "labels": torch.tensor([0, 1, 2])}
    with pytest.warns(InactiveModuleWarning, match=r"\['t'\] are attached and trainable but not active.*"
                                                   r"model.use\('t'\)"):
        loss = host(**batch).loss
    with pytest.raises(RuntimeError, match="does not require grad"):  # what PyTorch says next
        loss.backward()
    with pytest.raises(pm.ConfigError, match=r"\['t'\] are attached but not active.*model.use\('t'\)"):
        pm.Trainer(model, ["t"], classification_data(16), config=pm.TrainConfig(steps=1, progress=False))
    model.add("u", pm.LoRA(rank=2))
    model.use("u")  # one of two trained modules idle: a warning, the run may intend it
    with pytest.warns(InactiveModuleWarning, match=r"\['t'\] are trained but not active, so they will not change"):
        pm.Trainer(model, ["t", "u"], classification_data(16), config=pm.TrainConfig(steps=1, progress=False))
    model.use("t")
    with warnings.catch_warnings():
        warnings.simplefilter("error", InactiveModuleWarning)
        host(**batch).loss.backward()  # active: no warning, gradients reach the module
    assert all(p.grad is not None for p in model["t"].parameters())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error", InactiveModuleWarning)
        model.use(None)
        host.eval()
        host(**batch)  # inference with nothing active is a normal thing to do


def test_yaml_1_1_exponent_floats_are_floats(tmp_path):
    assert read_yaml("lr: 4e-3\nother: 1E5\nn: 12\ns: e5\nv: 1.5") == {"lr": 0.004, "other": 100000.0, "n": 12,
                                                                          "s": "e5", "v": 1.5}
    _host_dir(tmp_path)
    _write(tmp_path, None)
    text = (tmp_path / "train.yaml").read_text().replace("lr: 0.02", "lr: 4e-3")
    assert "lr: 4e-3" in text
    (tmp_path / "train.yaml").write_text(text)
    assert load_config(tmp_path / "train.yaml")["training"]["lr"] == 0.004


def test_check_resolves_sites_against_the_host(tmp_path, monkeypatch, capsys):
    _host_dir(tmp_path)
    cfg = _write(tmp_path, None)
    cfg["modules"]["t"]["sites"] = "attn.q|*.nope|query"
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "train.yaml"), "--check")
    message = " ".join(err.split())
    assert code == 1 and "2 problem(s) on its host" in message
    assert "modules.t.sites: sites pattern '*.nope' matched nothing" in message
    assert "sites pattern 'query' matched nothing" in message and "'*.query'" in message
    assert "'attn.q' matched" not in message
    cfg["modules"]["t"]["sites"] = "attn.q|attn.v"
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "train.yaml"), "--check")
    assert code == 0, err
    assert json.loads(out) == {"valid": True, "sites": {"t": 4}}
    assert not (tmp_path / "run").exists()  # nothing was trained


def test_load_with_host_checks_polymod_modules(tmp_path):
    model = pm.Modular(make_host("bert"))
    model.add("a", pm.LoRA(rank=2))
    pm.save(model["a"], tmp_path / "a")
    with pytest.raises(pm.IncompatibleHostError, match="does not fit this host"):
        pm.load(tmp_path / "a", host=make_host("gpt2"))
    with pytest.warns(pm.HostMismatchWarning, match="made for a different host"):
        pm.load(tmp_path / "a", host=make_host("bert", seed=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", pm.HostMismatchWarning)
        pm.load(tmp_path / "a", host=make_host("bert"))
