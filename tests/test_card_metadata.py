"""Card metadata through pm.save's keywords, and the base model named on the card (issue 14, item 6)."""

from __future__ import annotations

import json

import pytest

import polymod as pm
from polymod.format import base_model
from polymod.hub.package import check_package_dir
from tests.hosts import make_host


def _module():
    host = make_host("bert")
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=2))
    return host, model["a"]


def test_save_fills_the_card_without_touching_the_module(tmp_path):
    host, module = _module()
    path = pm.save(module, tmp_path / "a", task="sentiment", description="Movie-review polarity.",
                   tags=["movies", "english"], license="apache-2.0", language="en",
                   readme="# Sentiment\n\nTrained on Rotten Tomatoes.\n", base_model=host)
    card = json.loads((path / "module.json").read_text())
    assert (card["task"], card["description"], card["tags"], card["license"], card["language"]) == (
        "sentiment", "Movie-review polarity.", ["movies", "english"], "apache-2.0", "en")
    assert (path / "README.md").read_text().startswith("# Sentiment")
    assert module.card.task is None and module.card.tags == []  # the in-memory card is unchanged
    assert card["host"]["base_model"] == base_model(host) and len(card["host"]["base_model"]["weights_sha256"]) == 64
    loaded = pm.load(path, host=host)
    assert loaded.card.task == "sentiment" and loaded.card.host["base_model"]["name"] == base_model(host)["name"]
    check_package_dir(path)  # still a package the hub accepts
    with pytest.raises(pm.ConfigError, match=r"tags must be a list of strings such as \['movies'"):
        pm.save(module, tmp_path / "bad", tags="movies")  # a string is not a list of tags


def test_base_model_hashes_tell_checkpoints_apart():
    a, b, same = make_host("bert", seed=0), make_host("bert", seed=1), make_host("bert", seed=0)
    fa, fb, fs = base_model(a), base_model(b), base_model(same)
    assert fa == fs  # the same checkpoint, loaded twice
    assert fa["config_sha256"] == fb["config_sha256"] and fa["weights_sha256"] != fb["weights_sha256"]
    assert base_model("sentence-transformers/all-MiniLM-L6-v2") == {"name": "sentence-transformers/all-MiniLM-L6-v2"}
    a.config.num_hidden_layers = 3
    assert base_model(a)["config_sha256"] != fa["config_sha256"]


def test_polymod_train_names_the_base_model_on_the_card(tmp_path, monkeypatch, capsys):
    from tests.test_train_cli import _cli, _host_dir, _write

    _host_dir(tmp_path)
    cfg = _write(tmp_path, None)
    cfg["training"].update(steps=2, eval_every=0, checkpoint_every=0)
    (tmp_path / "train.yaml").write_text(json.dumps(cfg))
    code, _, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "train.yaml"))
    assert code == 0, err
    card = json.loads((tmp_path / "run" / "modules" / "t" / "module.json").read_text())
    assert card["host"]["base_model"]["name"].endswith("host") and "weights_sha256" in card["host"]["base_model"]
