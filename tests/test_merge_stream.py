"""Whole checkpoints: streaming == in-memory bit for bit, task vectors, recipes and `polymod merge`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

import polymod as pm
from polymod.cli import app
from polymod.merging.merge import merge
from polymod.merging.methods import MergeSpec
from polymod.merging.recipe import load_recipe
from polymod.merging.shards import BackgroundWriter, Checkpoint, ShardedWriter
from polymod.merging.streaming import merge_checkpoints, merge_state_dicts, task_vector
from polymod.sites import named_layers
from tests.hosts import logits, make_batch, make_host
from tests.merge_helpers import one_thread  # noqa: F401 - an autouse fixture

SPECS = [
    MergeSpec("ties", (1.0, 0.5, 0.8), (0.2, 0.3, 0.5)),
    MergeSpec("dare_ties", (1.0, 1.0, 1.0), (0.3, 0.3, 0.3), rescale="l1", seed=3),
    MergeSpec("dare_linear", (0.5, 1.0, 1.0), (0.4, 0.4, 0.4), seed=1),
    MergeSpec("task_arithmetic", (1.0, -1.0, 0.5), lam=0.7),
    MergeSpec("breadcrumbs_ties", (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), gamma=(0.05, 0.05, 0.05)),
]


def state(host) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in host.state_dict().items()}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny Llama saved sharded as a base and three fine-tunes (leaf weights and norms changed)."""
    root = tmp_path_factory.mktemp("ckpts")
    host = make_host("llama")
    base = state(host)
    host.save_pretrained(root / "base", max_shard_size="20KB")
    tuned = []
    for i in range(3):
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for p in host.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        host.save_pretrained(root / f"ft{i}", max_shard_size="20KB")
        tuned.append(state(host))
        host.load_state_dict(base)
    return root, base, tuned


def read_all(path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as ck:
        return {n: ck.read(n) for n in ck.names}


@pytest.mark.parametrize("spec", SPECS, ids=[s.method for s in SPECS])
def test_streaming_merge_equals_the_in_memory_merge_bit_for_bit(checkpoints, tmp_path, spec):
    root, _, _ = checkpoints
    models = [root / f"ft{i}" for i in range(3)]
    out = merge_checkpoints(root / "base", models, spec, tmp_path / "out", shard_bytes=30_000, block=1000)
    want = merge_state_dicts(read_all(root / "base"), [read_all(m) for m in models], spec)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(want) and len(set(index["weight_map"].values())) > 1
    got = {}
    for shard in set(index["weight_map"].values()):
        with safe_open(out / shard, "pt") as f:
            got.update({k: f.get_tensor(k) for k in f.keys()})
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in got.values())
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_checkpoint_merge_equals_merging_task_vector_modules(checkpoints, tmp_path):
    root, base, tuned = checkpoints
    host = make_host("llama")
    spec = MergeSpec("ties", (1.0, 1.0, 1.0), (0.2, 0.2, 0.2))
    out = merge_checkpoints(root / "base", [root / f"ft{i}" for i in range(3)], spec, tmp_path / "out")
    merged = read_all(out)
    vectors = {f"ft{i}": task_vector(root / "base", root / f"ft{i}", host, name=f"ft{i}") for i in range(3)}
    module = merge(vectors, "ties", density=0.2)
    for site, d in module.delta().items():
        assert torch.equal(merged[f"{site}.weight"], base[f"{site}.weight"] + d), site
    cfg = json.loads((out / "config.json").read_text())  # the base's config travels with the weights
    assert cfg["model_type"] == "llama"


def test_task_vector_dense_reproduces_the_fine_tune(checkpoints):
    root, base, tuned = checkpoints
    host = make_host("llama")
    tv = task_vector(root / "base", root / "ft0", host, name="ft0")
    assert tv.kind == "delta" and tv.card.lineage.parents[1].weight == 1.0
    assert "model.norm.weight" in tv.card.metrics["uncaptured"]  # norms changed but are no leaf-layer weight
    fine = make_host("llama")
    fine.load_state_dict(tuned[0])
    for name in tv.card.metrics["uncaptured"]:  # give the base the changes a module cannot hold
        host.state_dict()[name].copy_(tuned[0][name])
    batch = make_batch("llama")
    model = pm.Modular(host)
    model.add("ft0", tv)
    model.use("ft0")
    torch.testing.assert_close(logits(host, batch), logits(fine, batch), rtol=1e-4, atol=1e-5)


def test_task_vector_sparsified(checkpoints):
    root, _, _ = checkpoints
    host = make_host("llama")
    per_tensor = task_vector(root / "base", root / "ft1", host, sparsify="magnitude", density=0.1)
    assert per_tensor.kind == "sparse"
    layers = named_layers(host)
    for site, part in per_tensor.items():
        assert part.indices.numel() == int(0.1 * layers[site].weight.numel())
    lt = task_vector(root / "base", root / "ft1", host, sparsify="lt-sft", density=0.1, sites="attn.q|attn.v")
    total = sum(layers[s].weight.numel() for s in lt.sites)
    assert sum(p.indices.numel() for _, p in lt.items()) == int(0.1 * total)
    with pytest.raises(pm.ConfigError, match="needs density in"):
        task_vector(root / "base", root / "ft1", host, sparsify="magnitude")


def write_recipe(path, text: str):
    path.write_text(text)
    return path


def test_recipe_runs_through_the_cli(checkpoints, tmp_path):
    root, _, _ = checkpoints
    recipe = write_recipe(tmp_path / "r.yaml", f"""
merge_method: ties
base_model: {root / 'base'}
models:
  - model: {root / 'base'}
  - model: {root / 'ft0'}
    parameters: {{weight: 1.0, density: 0.2}}
  - model: {root / 'ft1'}
    parameters: {{weight: 0.5, density: 0.3}}
parameters: {{normalize: true}}
dtype: bfloat16
""")
    parsed = load_recipe(recipe)
    assert parsed.spec.weights == (1.0, 0.5) and parsed.spec.density == (0.2, 0.3) and parsed.dtype == torch.bfloat16
    result = CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--quiet"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    got = read_all(tmp_path / "out")
    want = merge_state_dicts(read_all(root / "base"), [read_all(root / "ft0"), read_all(root / "ft1")],
                             parsed.spec, dtype=torch.bfloat16)
    assert all(torch.equal(got[k], v) for k, v in want.items())
    lineage = json.loads((tmp_path / "out/merge_recipe.json").read_text())
    assert lineage["recipe"]["method"] == "ties" and lineage["models"] == [str(root / "ft0"), str(root / "ft1")]


def test_linear_recipe_merges_weights_normalised(checkpoints, tmp_path):
    root, base, tuned = checkpoints
    recipe = write_recipe(tmp_path / "r.yaml", f"""
merge_method: linear
models:
  - model: {root / 'ft0'}
    parameters: {{weight: 3.0}}
  - model: {root / 'ft1'}
    parameters: {{weight: 1.0}}
""")
    parsed = load_recipe(recipe)
    assert parsed.base is None and parsed.spec.normalize
    CliRunner().invoke(app, ["merge", str(recipe), str(tmp_path / "out"), "--quiet"], catch_exceptions=False)
    got = read_all(tmp_path / "out")
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(got[name], (3 * tuned[0][name] + tuned[1][name]) / 4, rtol=0, atol=1e-7)


def test_a_bad_recipe_lists_every_problem_at_once(checkpoints, tmp_path):
    root, _, _ = checkpoints
    recipe = write_recipe(tmp_path / "bad.yaml", f"""
merge_method: ties
modules: {{}}
models:
  - model: {root / 'ft0'}
    parameters: {{weight: 1.0, density: 1.5}}
  - model: {tmp_path / 'missing'}
    parameters: {{weight: 1.0}}
  - model: {root / 'ft1'}
    parameters: {{density: 0.2, epsilon: 0.1}}
  - model: {root / 'ft2'}
    parameters: {{weight: [0.1, heavy]}}
parameters: {{normalize: yes please}}
dtype: float8
""")
    with pytest.raises(pm.ConfigError) as info:
        load_recipe(recipe)
    message = str(info.value)
    expected = ["modules: per-module recipes", "base_model is required by ties",
                "models[0].parameters.density must be in", "models[1].model:", "does not exist", "models[2]",
                "has no parameters.weight", "unknown parameter 'epsilon' for ties",
                "models[3].parameters.weight: every gradient anchor must be a number",
                "parameters.normalize must be true or false", "dtype is 'float8'"]
    for fragment in expected:
        assert fragment in message, fragment
    assert "has 9 problems" in message


def test_mismatched_checkpoints_are_listed(checkpoints, tmp_path):
    root, _, _ = checkpoints
    gpt = make_host("gpt2")
    gpt.save_pretrained(tmp_path / "gpt")
    recipe = write_recipe(tmp_path / "r.yaml", f"""
merge_method: task_arithmetic
base_model: {root / 'base'}
models:
  - model: {tmp_path / 'gpt'}
    parameters: {{weight: 1.0}}
""")
    with pytest.raises(pm.ConfigError, match=r"(?s)2 problems:.*gpt lacks relative to .*base: .*gpt has extra tensors"):
        load_recipe(recipe)


def test_cli_errors_exit_1_without_a_traceback(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: kasher\nmodels: []\n")
    cmd = [sys.executable, "-c", "from polymod.cli import main; main()", "merge", str(recipe), str(tmp_path / "o")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "merge_method is 'kasher'" in proc.stderr and "models must be a non-empty list" in proc.stderr
    recipe.write_text("merge_method: karcher\nmodels: []\n")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 1 and "merge_method karcher is not supported: the Karcher mean iterates" in proc.stderr


def test_streaming_refuses_global_trimming(checkpoints, tmp_path):
    root, _, _ = checkpoints
    spec = MergeSpec("ties", (1.0,), (0.2,), trim="global")
    with pytest.raises(pm.ConfigError, match="a streaming merge trims each tensor"):
        merge_checkpoints(root / "base", [root / "ft0"], spec, tmp_path / "out")


def test_the_background_writer_keeps_order_and_reports_a_failed_write(tmp_path):
    layout = [("a", torch.float32, (3, 4)), ("b", torch.float32, (5,))]
    writer = BackgroundWriter(ShardedWriter(tmp_path / "ok", layout, 1 << 20))
    a, b = torch.arange(12.0).view(3, 4), torch.ones(5)
    for chunk in (a[:1], a[1:]):
        writer.write("a", chunk.clone())
    writer.write("b", b)
    writer.close()
    with Checkpoint(tmp_path / "ok") as ck:
        assert torch.equal(ck.read("a"), a) and torch.equal(ck.read("b"), b)
    writer = BackgroundWriter(ShardedWriter(tmp_path / "bad", layout, 1 << 20))
    writer.write("b", b)  # out of order: raised by the writing thread, reported to the caller
    with pytest.raises(RuntimeError, match="expected tensor 'a', got 'b'"):
        writer.close()
