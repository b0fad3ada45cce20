"""Site selection: roles per family, globs, regexes, types and helpful errors."""

from __future__ import annotations

import pytest
from torch import nn

import polymod as pm
from polymod.roles import family_of
from tests.hosts import make_host

EXPECTED = {  # family -> role -> the site names of layer 0 (or the embedding)
    "bert": {"attn.q": "bert.encoder.layer.0.attention.self.query",
             "attn.o": "bert.encoder.layer.0.attention.output.dense",
             "ffn.in": "bert.encoder.layer.0.intermediate.dense", "ffn.out": "bert.encoder.layer.0.output.dense",
             "embed": "bert.embeddings.word_embeddings", "block.out": "bert.encoder.layer.0"},
    "gpt2": {"attn.q": "transformer.h.0.attn.c_attn", "attn.v": "transformer.h.0.attn.c_attn",
             "attn.o": "transformer.h.0.attn.c_proj", "ffn.in": "transformer.h.0.mlp.c_fc",
             "ffn.out": "transformer.h.0.mlp.c_proj", "embed": "transformer.wte", "block.out": "transformer.h.0"},
    "llama": {"attn.q": "model.layers.0.self_attn.q_proj", "attn.k": "model.layers.0.self_attn.k_proj",
              "ffn.in": "model.layers.0.mlp.gate_proj", "ffn.out": "model.layers.0.mlp.down_proj",
              "embed": "model.embed_tokens", "block.out": "model.layers.0"},
    "t5": {"attn.q": "encoder.block.0.layer.0.SelfAttention.q", "attn.v": "encoder.block.0.layer.0.SelfAttention.v",
           "ffn.in": "encoder.block.0.layer.1.DenseReluDense.wi",
           "ffn.out": "encoder.block.0.layer.1.DenseReluDense.wo",
           "embed": "encoder.embed_tokens", "block.out": "encoder.block.0"},
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_roles_resolve_per_family(family):
    host = make_host(family)
    assert family_of(host) == family
    for role, first in EXPECTED[family].items():
        names = [s.name for s in pm.select(host, role)]
        assert names[0] == first, (role, names[:3])
        assert len(names) >= 2 or role == "embed"  # one per layer (2 layers), one embedding (two in T5)


def test_role_counts_and_kinds():
    host = make_host("llama")
    assert len(pm.select(host, "ffn.in")) == 4  # gate and up, 2 layers
    sites = pm.select(host, "linear")
    assert len(sites) == 14 and all(s.kind == "linear" for s in sites)
    assert "lm_head" not in {s.name for s in sites}, "the output head is not part of 'linear'"
    t5 = pm.select(make_host("t5"), "attn.q")
    assert any("EncDecAttention" in s.name for s in t5) and len(t5) == 6  # 2 enc self, 2 dec self, 2 dec cross
    gpt2 = pm.select(make_host("gpt2"), "attn.q")
    assert gpt2[0].kind == "conv1d" and (gpt2[0].in_features, gpt2[0].out_features) == (32, 96)


def test_glob_regex_union_and_types():
    host = make_host("llama")
    assert [s.name for s in pm.select(host, "*.layers.1.*.q_proj")] == ["model.layers.1.self_attn.q_proj"]
    assert len(pm.select(host, r"re:layers\.0\.mlp\.(up|down)_proj$")) == 2
    union = pm.select(host, ["attn.q", "attn.v|*.o_proj"])
    assert len(union) == 6 and len({s.name for s in union}) == 6
    norms = pm.select(host, pm.SiteSelector(patterns=("re:layers\\.0\\.",), types=(nn.Linear,)))
    assert len(norms) == 7


def test_no_match_names_pattern_and_close_candidates():
    host = make_host("llama")
    with pytest.raises(pm.SiteNotFoundError, match=r"'\*\.q_projj' matched nothing.*q_proj"):
        pm.select(host, "*.q_projj")
    with pytest.raises(pm.SiteNotFoundError, match="attn.qq"):
        pm.select(host, "attn.qq")
    with pytest.raises(pm.ConfigError, match="does not compile"):
        pm.select(host, "re:([")
    with pytest.raises(pm.ConfigError, match="empty"):
        pm.select(host, " | ")


def test_gpt2_fused_projection_is_reported():
    model = pm.Modular(make_host("gpt2"))
    report = model.add("q", pm.LoRA(sites="attn.q"))
    assert any("c_attn" in n and "together" in n for n in report.notes)
