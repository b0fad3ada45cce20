"""Merged LoRAs stay small: exact sparse when TIES/DARE allow it, else the lowest rank within max_rel_error."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.hub.package import check_card_dict
from polymod.merging.compact import smallest_rank, truncation_errors
from polymod.merging.merge import merge
from tests.hosts import make_host, randomize
from tests.merge_helpers import one_thread  # noqa: F401 - an autouse fixture


@pytest.fixture
def model():
    model = pm.Modular(make_host("llama"))
    for name in "ab":
        model.add(name, pm.LoRA(rank=4, sites="attn.q|attn.v|ffn.out"))
        randomize(model[name], 0.1)
    return model


def test_ties_of_loras_keeps_the_exact_sparse_result_when_smaller(model, tmp_path):
    a, b = model["a"], model["b"]
    auto = merge({"a": a, "b": b}, "ties", density=0.2)
    dense = merge({"a": a, "b": b}, "ties", density=0.2, result="dense")
    assert auto.kind == "sparse" and dense.kind == "delta"
    for site, d in dense.delta().items():
        assert torch.equal(auto.delta()[site], d), site  # exact, not approximated
    rep = auto.card.metrics["representation"]
    assert rep["kind"] == "sparse" and rep["value"] < rep["dense_bytes"]
    check_card_dict(auto.card.to_dict())  # publishable: a metric with a numeric value
    pm.save(auto, tmp_path / "sparse")
    pm.save(dense, tmp_path / "dense")
    sizes = {k: (tmp_path / k / "weights.safetensors").stat().st_size for k in ("sparse", "dense")}
    assert sizes["sparse"] < 0.9 * sizes["dense"]
    half = merge({"a": a, "b": b}, "ties", density=0.6)  # up to 100% non-zero: dense is smaller
    assert half.kind == "delta" and half.card.metrics["representation"]["kind"] == "delta"


def test_max_rel_error_picks_the_smallest_rank_meeting_it(model):
    a, b = model["a"], model["b"]
    exact = merge({"a": a, "b": b}, "ties", density=0.3, result="dense").delta()
    low = merge({"a": a, "b": b}, "ties", density=0.3, max_rel_error=0.5)
    rep = low.card.metrics["representation"]
    assert low.kind == "lora" and low.spec.rank == rep["rank"] and rep["value"] < rep["dense_bytes"]
    assert low.card.lineage.recipe["max_rel_error"] == 0.5
    check_card_dict(low.card.to_dict())
    worst = 0.0
    for site, d in low.delta().items():
        with torch.no_grad():
            err = float((d - exact[site]).norm() / exact[site].norm())
        assert err <= 0.5 + 1e-6
        worst = max(worst, err)
    assert rep["measured_rel_error"] == pytest.approx(worst, rel=1e-4)
    assert low.card.metrics["svd_relative_error"]["value"] == pytest.approx(worst, rel=1e-4)
    # minimal: one rank less breaks the bound at some site
    needed = [smallest_rank(truncation_errors(d.t()), 0.5) for d in exact.values()]
    assert rep["rank"] == max(needed) and any(float(truncation_errors(d.t())[rep["rank"] - 1]) > 0.5
                                                for d in exact.values())


def test_a_bound_no_low_rank_form_beats_keeps_the_exact_form(model):
    a, b = model["a"], model["b"]
    tight = merge({"a": a, "b": b}, "ties", density=0.3, max_rel_error=0.0)
    rep = tight.card.metrics["representation"]
    assert tight.kind in ("delta", "sparse") and rep["measured_rel_error"] == 0.0
    assert "kept exact" in rep["note"] and rep["lora_bytes"] >= rep["value"]
    cat = merge({"a": a, "b": b}, "task_arithmetic")  # linear in ΔW: exact low rank (concatenation)
    assert cat.kind == "lora" and cat.spec.rank == 8


def test_max_rel_error_errors(model):
    a, b = model["a"], model["b"]
    with pytest.raises(pm.ConfigError, match=r"max_rel_error must be in \[0, 1\)"):
        merge({"a": a, "b": b}, "ties", density=0.3, max_rel_error=1.5)
    with pytest.raises(pm.ConfigError, match="cannot be combined with rank"):
        merge({"a": a, "b": b}, "ties", density=0.3, lora="delta", rank=4, max_rel_error=0.1)
    with pytest.raises(pm.ConfigError, match="cannot be combined with .*lora='cat'"):
        merge({"a": a, "b": b}, "linear", max_rel_error=0.1)


def test_truncation_errors_follow_eckart_young():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(12, 7, generator=g)
    errors = truncation_errors(m)
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    for r in range(8):
        approx = (u[:, :r] * s[:r]) @ vh[:r]
        assert float(errors[r]) == pytest.approx(float((m.double() - approx).norm() / m.double().norm()), abs=1e-9)
    assert smallest_rank(errors, 0.0) == 7 and smallest_rank(errors, 1.0) == 0
