"""LoRA-aware merging: concatenation, ΔW-wise with SVD re-factorisation, A/B-wise averaging."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.merging.merge import merge
from tests.hosts import logits, make_batch, make_host, randomize
from tests.merge_helpers import one_thread  # noqa: F401 - an autouse fixture


@pytest.fixture
def model():
    model = pm.Modular(make_host("gpt2"))  # Conv1D sites: ΔW is stored transposed
    model.add("a", pm.LoRA(rank=3, alpha=6, sites="attn.q|ffn.out"))
    model.add("b", pm.LoRA(rank=2, sites="attn.q|ffn.out"))
    model.add("c", pm.LoRA(rank=3, sites="attn.q|ffn.out"))
    for name in "abc":
        randomize(model[name], 0.1)
    return model


def test_concatenation_is_exact_and_equals_the_sum_of_outputs(model):
    a, b = model["a"], model["b"]
    m = merge({"a": a, "b": b}, "linear", [0.7, -1.2])
    assert m.kind == "lora" and m.spec.rank == 5 and m.spec.scaling == 1.0
    for site, part in m.items():
        x, y = torch.randn(2, 4, part.A.shape[1]), torch.zeros(2, 4, part.B.shape[0])
        want = 0.7 * a.part(site)(x, y) - 1.2 * b.part(site)(x, y)
        torch.testing.assert_close(part(x, y), want, rtol=1e-5, atol=1e-6)
    both = merge({"a": a, "b": b}, "task_arithmetic")  # weights 1: the output of a and b stacked
    model.add("ab", both)
    batch = make_batch("gpt2")
    model.use(pm.Stack("a", "b"))
    stacked = logits(model.host, batch)
    model.use("ab")
    torch.testing.assert_close(logits(model.host, batch), stacked, rtol=1e-5, atol=1e-5)


def test_svd_at_full_rank_is_exact_and_reports_the_error(model):
    a, b = model["a"], model["b"]
    full = merge({"a": a, "b": b}, "linear", [0.5, 0.5], lora="delta", rank=32)  # min(D_in, D_out) = 32
    want = {s: 0.5 * a.delta()[s] + 0.5 * b.delta()[s] for s in a.sites}
    for site, d in full.delta().items():
        torch.testing.assert_close(d, want[site], rtol=0, atol=1e-6)
    assert full.card.metrics["svd_relative_error"]["value"] < 1e-6
    low = merge({"a": a, "b": b}, "linear", [0.5, 0.5], lora="delta", rank=2)
    metric = low.card.metrics["svd_relative_error"]
    with torch.no_grad():
        measured = {site: float((d - want[site]).norm() / want[site].norm()) for site, d in low.delta().items()}
    worst = max(measured, key=measured.__getitem__)
    assert metric["value"] == metric["max"] == pytest.approx(measured[worst], rel=1e-4)
    assert metric["worst_site"] == worst and metric["rank"] == 2
    assert metric["mean"] == pytest.approx(sum(measured.values()) / len(measured), rel=1e-4)
    assert min(measured.values()) > 0.05  # rank 5 cut to 2
    assert low.card.lineage.recipe["rank"] == 2 and low.spec.rank == 2


def test_ties_on_lora_deltas_then_svd(model):
    a, b = model["a"], model["b"]
    dense = merge({"a": a, "b": b}, "ties", density=0.3)  # ΔW-wise by default for non-linear methods
    assert dense.kind == "delta"
    svd = merge({"a": a, "b": b}, "ties", density=0.3, lora="delta", rank=32)
    for site, d in svd.delta().items():
        torch.testing.assert_close(d, dense.delta()[site], rtol=0, atol=1e-6)


def test_ab_wise_averaging_is_not_linear_in_delta_w(model):
    a, c = model["a"], model["c"]
    w = [0.6, 0.4]
    m = merge({"a": a, "c": c}, "linear", w, lora="ab")
    pa, pc = a.part(next(iter(a.sites))), c.part(next(iter(a.sites)))
    part = m.part(next(iter(a.sites)))
    torch.testing.assert_close(part.A, w[0] * pa.A + w[1] * pc.A)
    torch.testing.assert_close(part.B, w[0] * pa.scaling * pa.B + w[1] * pc.scaling * pc.B)
    # B A = Σ_i Σ_j w_i w_j s_j B_j A_i: cross terms, so not the weighted sum of the ΔW.
    parts = [pa, pc]
    cross = sum(w[i] * w[j] * parts[j].scaling * parts[j].B @ parts[i].A for i in range(2) for j in range(2))
    torch.testing.assert_close((part.B @ part.A) * part.scaling, cross, rtol=1e-5, atol=1e-7)
    linear = w[0] * pa.B @ pa.A * pa.scaling + w[1] * pc.B @ pc.A * pc.scaling
    assert not torch.allclose(cross, linear, atol=1e-4)
    one = merge({"a": a}, "linear", [0.5], lora="ab")  # one module with weight w: w² ΔW
    torch.testing.assert_close(one.delta()[next(iter(a.sites))], 0.25 * a.delta()[next(iter(a.sites))])


def test_lora_semantics_errors(model):
    a, b = model["a"], model["b"]
    with pytest.raises(pm.ConfigError, match="lora='cat' is exact only for methods linear in ΔW"):
        merge({"a": a, "b": b}, "ties", density=0.5, lora="cat")
    with pytest.raises(pm.ConfigError, match=r"needs equal ranks, got \[3, 2\]"):
        merge({"a": a, "b": b}, "linear", lora="ab")
    with pytest.raises(pm.ConfigError, match="rank .*needs lora='delta'"):
        merge({"a": a, "b": b}, "linear", rank=4)
    from polymod.modules.delta import Delta

    model.add("dd", Delta(sites="attn.q|ffn.out"))
    with pytest.raises(pm.ConfigError, match="applies to LoRA inputs only"):
        merge({"a": a, "dd": model["dd"]}, "linear", lora="cat")


def test_an_svd_refactorised_merge_publishes_with_its_error_metric(model, tmp_path):
    """The hub accepts only metrics with a numeric value: the rank= merge's card must pass."""
    low = merge({"a": model["a"], "b": model["b"]}, "linear", [0.5, 0.5], lora="delta", rank=2, name="ab")
    store = pm.hub.Store(tmp_path / "store")
    info = pm.hub.push(pm.save(low, tmp_path / "pkg"), "alice/ab@1.0.0", hub=store)
    pulled = pm.load(pm.hub.pull("alice/ab@1.0.0", tmp_path / "pulled", hub=store))
    got = pulled.card.metrics["svd_relative_error"]
    assert info.version == "1.0.0" and got["value"] == pytest.approx(low.card.metrics["svd_relative_error"]["value"])
    assert 0.05 < got["value"] < 1
