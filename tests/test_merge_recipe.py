"""Recipe semantics of `polymod merge`: one document, paths as mergekit resolves them, atomic output, messages."""

from __future__ import annotations

import json
import os

import pytest
import torch

import polymod as pm
from polymod.merging.recipe import load_recipe, merge_command
from polymod.merging.shards import Checkpoint
from tests.hosts import make_host
from tests.merge_helpers import one_thread  # noqa: F401 - an autouse fixture


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny Llama base and two fine-tunes, unsharded."""
    root = tmp_path_factory.mktemp("ckpts")
    host = make_host("llama")
    base = {k: v.clone() for k, v in host.state_dict().items()}
    host.save_pretrained(root / "base")
    for i in range(2):
        g = torch.Generator().manual_seed(30 + i)
        with torch.no_grad():
            for p in host.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        host.save_pretrained(root / f"ft{i}")
        host.load_state_dict(base)
    return root


def ties(root, base="base", models=("ft0", "ft1")) -> str:
    lines = "".join(f"  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for m in models)
    return f"merge_method: ties\nbase_model: {base}\nmodels:\n{lines}"


def test_a_multi_document_recipe_is_refused_by_name(ckpts, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties(ckpts / "") + "---\n" + ties(ckpts / ""))
    with pytest.raises(pm.ConfigError, match=r"holds 2 YAML documents; a recipe is exactly one document.*'---'"):
        load_recipe(recipe)
    recipe.write_text("# nothing\n")
    with pytest.raises(pm.ConfigError, match="holds 0 YAML documents"):
        load_recipe(recipe)


def test_relative_paths_resolve_against_the_working_directory(ckpts, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties(None))
    monkeypatch.chdir(ckpts)  # as mergekit-yaml: ./base is the working directory's
    parsed = load_recipe(recipe)
    assert parsed.base == ckpts / "base" and parsed.models == (ckpts / "ft0", ckpts / "ft1")


def test_a_path_found_only_beside_the_recipe_is_refused_with_the_fix(ckpts, tmp_path, monkeypatch):
    recipe = ckpts / "beside.yaml"
    recipe.write_text(ties(None))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(pm.ConfigError, match=r"(?s)3 problems.*base_model: .*base does not exist; relative paths "
                                             r"resolve against the working directory.*exists only beside the recipe"
                                             r".*run from .*ckpts"):
        load_recipe(recipe)


def test_a_path_naming_two_checkpoints_is_refused_as_ambiguous(ckpts, tmp_path, monkeypatch):
    other = tmp_path / "elsewhere"
    other.mkdir()
    make_host("llama", seed=5).save_pretrained(other / "base")
    recipe = ckpts / "amb.yaml"
    recipe.write_text(ties(None))
    monkeypatch.chdir(other)
    with pytest.raises(pm.ConfigError, match=r"base_model: 'base' is ambiguous: relative to the working directory "
                                             r"it is .*elsewhere/base, relative to the recipe's folder it is "
                                             r".*write the path absolute"):
        load_recipe(recipe)


def test_a_missing_base_model_is_one_error(ckpts, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties(ckpts, base=tmp_path / "nope", models=(ckpts / "ft0",)))
    with pytest.raises(pm.ConfigError, match=r"has 1 problem:\n  - base_model: .*nope does not exist") as info:
        load_recipe(recipe)
    assert "required" not in str(info.value)


def test_rescale_message_lists_every_accepted_value(ckpts, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties(ckpts, base=ckpts / "base", models=(ckpts / "ft0",)).replace("ties", "dare_ties")
                      + "parameters: {rescale: l2}\n")
    with pytest.raises(pm.ConfigError, match=r"rescale must be one of true or 'l1' .*'inverse' .*false or 'none'.*"
                                             r"got 'l2'"):
        load_recipe(recipe)
    for value in ("true", "false", "l1", "inverse", "none"):
        recipe.write_text(recipe.read_text().rsplit("parameters:", 1)[0] + f"parameters: {{rescale: {value}}}\n")
        load_recipe(recipe)


def test_merging_into_a_used_directory_leaves_no_stale_shards(ckpts, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties(ckpts, base=ckpts / "base", models=(ckpts / "ft0", ckpts / "ft1")) + "dtype: bfloat16\n")
    out = tmp_path / "out"
    merge_command(recipe, out, shard_size="10KB", progress=False)
    many = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(many) > 1
    merge_command(recipe, out, shard_size="1GB", progress=False)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no staging leftovers
    with Checkpoint(out) as ck:
        assert ck.read("model.norm.weight").dtype == torch.bfloat16
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"  # the output dtype is written into config.json, as mergekit does
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_failed_merge_leaves_the_old_output_and_foreign_directories_are_refused(ckpts, tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(ties(ckpts, base=ckpts / "base", models=(ckpts / "ft0",)))
    out = tmp_path / "out"
    merge_command(recipe, out, progress=False)
    before = (out / "model.safetensors").read_bytes()
    import polymod.merging.jobs as jobs

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(jobs, "_stream_tensor", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        merge_command(recipe, out, progress=False)
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    monkeypatch.undo()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(pm.FormatError, match="non-empty directory that holds no checkpoint"):
        merge_command(recipe, mine, progress=False)
    assert (mine / "notes.txt").read_text() == "keep me"
