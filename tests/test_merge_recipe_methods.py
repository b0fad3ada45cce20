"""Recipe methods and features as mergekit runs them: slerp, nuslerp, model_stock, della, gradients, filters, slices."""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers as tf

import polymod as pm
from polymod.merging.elementwise import ElementwiseSpec
from polymod.merging.interp import InterpSpec, interp_tensor
from polymod.merging.methods import MergeSpec
from polymod.merging.recipe import load_recipe, merge_command
from polymod.merging.settings import evaluate
from polymod.merging.shards import Checkpoint
from polymod.merging.streaming import merge_state_dicts
from tests.merge_helpers import one_thread  # noqa: F401 - an autouse fixture

LAYERS = 3


def tiny(seed: int) -> tf.LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, vocab_size=64, max_position_embeddings=32)
    return tf.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    """A 3-layer Llama base and three fine-tunes (every tensor moved), saved sharded."""
    root = tmp_path_factory.mktemp("ck")
    host = tiny(0)
    base = {k: v.clone() for k, v in host.state_dict().items()}
    host.save_pretrained(root / "base", max_shard_size="30KB")
    for i in range(3):
        g = torch.Generator().manual_seed(40 + i)
        with torch.no_grad():
            for p in host.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        host.save_pretrained(root / f"ft{i}")
        host.load_state_dict(base)
    return root


def read(path) -> dict[str, torch.Tensor]:
    with Checkpoint(path) as c:
        return {n: c.read(n).clone() for n in c.names}


def run(tmp_path, text: str, name: str = "out"):
    recipe = tmp_path / f"{name}.yaml"
    recipe.write_text(text)
    out = merge_command(recipe, tmp_path / name, progress=False)
    return load_recipe(recipe), read(out), out


def slerp_ref(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SLERP written from its definition, in float64."""
    a64, b64 = a.double().reshape(-1), b.double().reshape(-1)
    cos = float((a64 / a64.norm()) @ (b64 / b64.norm()))
    if abs(cos) > 0.9995:
        return ((1 - t) * a64 + t * b64).reshape(a.shape)
    om = math.acos(cos)
    return ((math.sin((1 - t) * om) * a64 + math.sin(t * om) * b64) / math.sin(om)).reshape(a.shape)


def test_settings_gradients_and_filters_resolve_as_mergekit():
    assert evaluate([0.0, 1.0], "x", 0.25) == 0.25
    assert evaluate([0.0, 0.5, 1.0, 0.0], "x", 0.5) == pytest.approx(0.75)  # between anchors 1 and 2
    assert evaluate([True, False], "x", 0.4) is True and evaluate([True, False], "x", 1.0) is False
    setting = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": 0.3}, {"value": 0.5}]
    assert evaluate(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(setting, "model.layers.1.mlp.up_proj.weight", 0.5) == 0.3
    assert evaluate(setting, "model.norm.weight", 0.0) == 0.5
    assert evaluate([{"filter": "mlp", "value": 1}], "model.norm.weight", 0.0) is None


def test_slerp_with_a_per_layer_gradient_and_filters(ck, tmp_path):
    parsed, got, _ = run(tmp_path, f"""
merge_method: slerp
base_model: {ck / 'base'}
models:
  - model: {ck / 'base'}
  - model: {ck / 'ft0'}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - filter: mlp
      value: [1, 0.5, 0]
    - value: 0.3
dtype: float32
""")
    base, ft = read(ck / "base"), read(ck / "ft0")
    expect_t = {"model.layers.0.self_attn.q_proj.weight": 0.0, "model.layers.1.self_attn.q_proj.weight": 0.5,
                "model.layers.2.self_attn.q_proj.weight": 1.0, "model.layers.0.mlp.up_proj.weight": 1.0,
                "model.layers.2.mlp.up_proj.weight": 0.0, "model.layers.1.input_layernorm.weight": 0.3,
                "model.embed_tokens.weight": 0.3}
    specs = {j.name: j.spec for j in parsed.jobs}
    for name, t in expect_t.items():
        assert specs[name] == InterpSpec("slerp", t=t), name
    assert parsed.spec is None  # parameters vary per tensor
    for name in got:
        t = specs[name].t
        torch.testing.assert_close(got[name].double(), slerp_ref(t, base[name], ft[name]), rtol=0, atol=2e-7)
        assert torch.equal(got[name], interp_tensor(specs[name], name, [base[name], ft[name]])), name  # streamed
    assert torch.equal(got["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


@pytest.mark.parametrize("options,group", [("", None), ("nuslerp_flatten: false", 0), ("nuslerp_flatten: false\n  "
                                                                                        "nuslerp_row_wise: true", 1)])
def test_nuslerp_with_a_base_interpolates_task_vectors(ck, tmp_path, options, group):
    _, got, _ = run(tmp_path, f"""
merge_method: nuslerp
base_model: {ck / 'base'}
models:
  - model: {ck / 'ft0'}
    parameters: {{weight: 1.0}}
  - model: {ck / 'ft1'}
    parameters: {{weight: 3.0}}
parameters:
  {options or 'nuslerp_flatten: true'}
""")
    base, a, b = read(ck / "base"), read(ck / "ft0"), read(ck / "ft1")
    name = "model.layers.1.mlp.down_proj.weight"
    ta, tb = (a[name] - base[name]).double(), (b[name] - base[name]).double()
    if group is None:
        want = slerp_ref(0.75, ta, tb)
    else:  # one angle per row (unbind 0: vectors along the last dim) or per column
        rows = [slerp_ref(0.75, x, y) for x, y in zip(ta.unbind(group), tb.unbind(group))]
        want = torch.stack(rows, dim=group)
    torch.testing.assert_close((got[name] - base[name]).double(), want, rtol=0, atol=1e-7)


def test_model_stock_follows_the_paper_formula(ck, tmp_path):
    _, got, _ = run(tmp_path, f"""
merge_method: model_stock
base_model: {ck / 'base'}
models:
  - model: {ck / 'ft0'}
  - model: {ck / 'ft1'}
  - model: {ck / 'ft2'}
""")
    base, fts = read(ck / "base"), [read(ck / f"ft{i}") for i in range(3)]
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):
        w0 = base[name].double().reshape(-1)
        taus = [f[name].double().reshape(-1) - w0 for f in fts]
        cos = [float(taus[i] @ taus[j] / (taus[i].norm() * taus[j].norm())) for i in range(3) for j in range(i + 1, 3)]
        c = sum(cos) / 3
        t = 3 * c / (1 + 2 * c)
        want = t * sum(f[name].double().reshape(-1) for f in fts) / 3 + (1 - t) * w0
        torch.testing.assert_close(got[name].double().reshape(-1), want, rtol=0, atol=1e-7)


def test_della_streams_exactly_and_keeps_density_on_average(ck, tmp_path):
    parsed, got, _ = run(tmp_path, f"""
merge_method: della
base_model: {ck / 'base'}
models:
  - model: {ck / 'ft0'}
    parameters: {{weight: 1.0, density: 0.4, epsilon: 0.1}}
  - model: {ck / 'ft1'}
    parameters: {{weight: 0.5, density: 0.4, epsilon: 0.1}}
""")
    spec = parsed.spec
    assert spec == MergeSpec("della", (1.0, 0.5), (0.4, 0.4), epsilon=(0.1, 0.1), rescale="l1", normalize=True)
    want = merge_state_dicts(read(ck / "base"), [read(ck / "ft0"), read(ck / "ft1")], spec)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    big = "model.embed_tokens.weight"
    linear = MergeSpec("della_linear", (1.0,), (0.4,), epsilon=(0.1,), rescale="none")
    kept = merge_state_dicts(read(ck / "base"), [read(ck / "ft0")], linear)[big] - read(ck / "base")[big]
    assert abs(float((kept != 0).float().mean()) - 0.4) < 0.02
    with pytest.raises(pm.ConfigError, match=r"epsilon must keep density ± epsilon inside \(0, 1\)"):
        MergeSpec("della", (1.0,), (0.1,), epsilon=(0.2,))


def test_ties_with_density_gradient_and_filter_per_tensor(ck, tmp_path):
    parsed, got, _ = run(tmp_path, f"""
merge_method: ties
base_model: {ck / 'base'}
models:
  - model: {ck / 'ft0'}
    parameters:
      weight: 1.0
      density: [0.2, 0.8]
  - model: {ck / 'ft1'}
    parameters:
      weight: [{{filter: mlp, value: 0.5}}, {{value: 1.0}}]
      density: 0.5
""")
    specs = {j.name: j.spec for j in parsed.jobs}
    assert specs["model.layers.0.mlp.up_proj.weight"].density == (0.2, 0.5)
    assert specs["model.layers.1.mlp.up_proj.weight"].density == pytest.approx((0.5, 0.5))
    assert specs["model.layers.2.self_attn.v_proj.weight"].density == pytest.approx((0.8, 0.5))
    assert specs["model.layers.2.mlp.up_proj.weight"].weights == (1.0, 0.5)
    assert specs["model.layers.2.self_attn.v_proj.weight"].weights == (1.0, 1.0)
    base, a, b = read(ck / "base"), read(ck / "ft0"), read(ck / "ft1")
    for name, spec in specs.items():
        want = merge_state_dicts({name: base[name]}, [{name: a[name]}, {name: b[name]}], spec)[name]
        assert torch.equal(got[name], want), name


def test_passthrough_frankenmerge_writes_a_valid_config(ck, tmp_path):
    _, got, out = run(tmp_path, f"""
merge_method: passthrough
slices:
  - sources:
      - model: {ck / 'ft0'}
        layer_range: [0, 3]
  - sources:
      - model: {ck / 'ft1'}
        layer_range: [1, 3]
        parameters:
          scale: [{{filter: o_proj, value: 0.0}}, {{value: 1.0}}]
dtype: bfloat16
""")
    a, b = read(ck / "ft0"), read(ck / "ft1")
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 5 and config["dtype"] == "bfloat16"
    assert torch.equal(got["model.layers.4.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"].bfloat16())
    assert torch.equal(got["model.layers.3.self_attn.q_proj.weight"],
                       b["model.layers.1.self_attn.q_proj.weight"].bfloat16())
    assert not got["model.layers.3.self_attn.o_proj.weight"].any()  # scaled by 0 through the filter
    assert torch.equal(got["model.embed_tokens.weight"], a["model.embed_tokens.weight"].bfloat16())  # first slice
    assert torch.equal(got["model.norm.weight"], b["model.norm.weight"].bfloat16())  # last slice
    model = tf.AutoModelForCausalLM.from_pretrained(out)  # the new layer count loads as a model and runs
    assert len(model.model.layers) == 5
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 64)


def test_slice_and_method_contracts_are_checked_whole(ck, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"""
merge_method: slerp
base_model: {ck / 'base'}
slices:
  - sources:
      - model: {ck / 'ft0'}
        layer_range: [0, 2]
      - model: {ck / 'ft1'}
        layer_range: [0, 3]
  - sources:
      - model: {ck / 'base'}
        layer_range: [2, 9]
      - model: {ck / 'ft1'}
        layer_range: [2, 9]
tokenizer_source: 7
""")
    with pytest.raises(pm.ConfigError) as info:
        load_recipe(recipe)
    message = str(info.value)
    for fragment in ("tokenizer_source is 7; expected base, union or a model path",
                     "slices[0]: every source of a slice spans the same number of layers, got [2, 3]",
                     "slices[0]: slerp needs the base model among the slice's sources",
                     "slices[0]: slerp takes exactly 1 model besides the base model, got 2"):
        assert fragment in message, fragment
    recipe.write_text(recipe.read_text().replace("tokenizer_source: 7\n", "").replace(
        f"model: {ck / 'ft0'}\n        layer_range: [0, 2]", f"model: {ck / 'base'}\n        layer_range: [0, 3]"))
    with pytest.raises(pm.ConfigError, match=r"layer_range \[2, 9\] is outside its 3 layers"):
        load_recipe(recipe)


def test_a_float32_passthrough_copies_bytes_exactly(ck, tmp_path):
    _, got, out = run(tmp_path, f"""
merge_method: passthrough
slices:
  - sources: [{{model: {ck / 'ft2'}, layer_range: [1, 3]}}]
  - sources: [{{model: {ck / 'ft0'}, layer_range: [0, 1]}}]
""")
    a, c = read(ck / "ft0"), read(ck / "ft2")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    for rest in ("self_attn.k_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight"):
        assert torch.equal(got[f"model.layers.0.{rest}"], c[f"model.layers.1.{rest}"])
        assert torch.equal(got[f"model.layers.1.{rest}"], c[f"model.layers.2.{rest}"])
        assert torch.equal(got[f"model.layers.2.{rest}"], a[f"model.layers.0.{rest}"])
    assert torch.equal(got["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert torch.equal(got["lm_head.weight"], a["lm_head.weight"])


def test_nearswap_moves_entries_by_their_distance(ck, tmp_path):
    _, got, _ = run(tmp_path, f"merge_method: nearswap\nbase_model: {ck / 'base'}\nparameters: {{t: 0.01}}\n"
                              f"models:\n  - model: {ck / 'base'}\n  - model: {ck / 'ft0'}\n")
    base, ft = read(ck / "base"), read(ck / "ft0")
    for name, a in base.items():
        d = (a - ft[name]).abs()
        w = (0.01 / torch.maximum(d, torch.tensor(1e-6))).clamp(0, 1)
        torch.testing.assert_close(got[name], w * ft[name] + (1 - w) * a, rtol=0, atol=1e-7)
    moved = torch.cat([(got[n] - a).abs().reshape(-1) / (ft[n] - a).abs().reshape(-1).clamp(min=1e-12)
                       for n, a in base.items()])
    assert 0.1 < float((moved > 0.99).float().mean()) < 0.9  # near entries swapped, far ones only nudged


def test_ram_keeps_unique_changes_and_averages_shared_ones(ck, tmp_path):
    _, got, _ = run(tmp_path, f"merge_method: ram\nbase_model: {ck / 'base'}\nparameters: {{epsilon: 0.02}}\n"
                              f"models:\n  - model: {ck / 'ft0'}\n  - model: {ck / 'ft1'}\n  - model: {ck / 'ft2'}\n")
    base, fts = read(ck / "base"), [read(ck / f"ft{i}") for i in range(3)]
    seen = {1: 0, 2: 0, 3: 0}
    for name, b in base.items():
        tv = torch.stack([ft[name] - b for ft in fts])  # (3, ...)
        changed = tv.abs() > 0.02
        count = changed.sum(0)
        want = b + torch.where(count > 0, (tv * changed).sum(0) / count.clamp(min=1), 0)
        torch.testing.assert_close(got[name], want, rtol=0, atol=1e-6)
        for c in seen:
            seen[c] += int((count == c).sum())
    assert all(v > 0 for v in seen.values())  # unique, shared by two and by all three entries all occur


def test_their_parameters_are_checked_with_the_recipe(ck, tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(f"merge_method: nearswap\nbase_model: {ck / 'base'}\nparameters: {{weight: 1}}\n"
                      f"models:\n  - model: {ck / 'ft0'}\n  - model: {ck / 'ft1'}\n")
    with pytest.raises(pm.ConfigError, match=r"(?s)unknown parameter 'weight' for nearswap \(expected t\).*"
                                             r"nearswap takes exactly 1 model besides the base model, got 2"):
        load_recipe(recipe)
    with pytest.raises(pm.ConfigError, match="nearswap: t must be a finite number >= 0, got -1"):
        ElementwiseSpec("nearswap", t=-1.0)


def test_multislerp_is_the_weighted_mean_direction_at_the_mean_norm(ck, tmp_path):
    _, got, _ = run(tmp_path, f"merge_method: multislerp\nbase_model: {ck / 'base'}\nmodels:\n"
                              f"  - {{model: {ck / 'ft0'}, parameters: {{weight: 1.0}}}}\n"
                              f"  - {{model: {ck / 'ft1'}, parameters: {{weight: 3.0}}}}\n"
                              f"  - {{model: {ck / 'ft2'}, parameters: {{weight: [{{filter: mlp, value: 0}}, "
                              f"{{value: 1.0}}]}}}}\n")
    base, fts = read(ck / "base"), [read(ck / f"ft{i}") for i in range(3)]
    for name, b in base.items():
        w = torch.tensor([1.0, 3.0, 0.0 if "mlp" in name else 1.0], dtype=torch.float64)
        w = w / w.sum()
        tv = [(ft[name] - b).double() for ft in fts]
        direction = sum(wi * t / t.norm() for wi, t in zip(w, tv))
        want = b.double() + direction / direction.norm() * sum(wi * t.norm() for wi, t in zip(w, tv))
        torch.testing.assert_close(got[name].double(), want, rtol=0, atol=1e-6)
    one, same, _ = run(tmp_path, f"merge_method: multislerp\nbase_model: {ck / 'base'}\n"
                                 f"models: [{{model: {ck / 'ft1'}, parameters: {{weight: 2}}}}]\n", "one")
    assert one.jobs[0].base is None  # a single input is returned as it is, as mergekit does
    assert all(torch.equal(same[k], v) for k, v in fts[1].items())
