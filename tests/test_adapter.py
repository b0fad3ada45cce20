"""Bottleneck adapters: placements per family, and the maths against an independent computation.

The reference copies of the host below are built by *replacing* host sub-modules
with small wrappers that compute the adapter by hand (no hooks, no polymod
parts), using the weights of the polymod module.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polymod as pm
from polymod.modules.adapter import Adapter
from tests.hosts import logits, make_batch, make_host, randomize


def _ref(part, h: torch.Tensor, act=F.relu) -> torch.Tensor:
    """s · (U act(D h + b_D) + b_U), computed from the part's tensors."""
    down = act(h @ part.down.weight.t() + part.down.bias)
    return (down @ part.up.weight.t() + part.up.bias) * part.scaling


class _After(nn.Module):
    """layer(x) followed by y + f(y) (sequential adapter on the output)."""

    def __init__(self, layer, f):
        super().__init__()
        self.layer, self.f = layer, f

    def forward(self, *args, **kwargs):
        out = self.layer(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + self.f(out[0]), *out[1:])
        return out + self.f(out)


def _attached(family: str, spec: Adapter, seed: int = 3):
    host = make_host(family)
    reference = copy.deepcopy(host)
    model = pm.Modular(host)
    model.add("a", spec)
    torch.manual_seed(seed)
    randomize(model["a"], std=0.3)
    model.use("a")
    return host, reference, model


def _layers(host, pattern: str) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in host.named_modules() if n.endswith(pattern)]


def test_sites_per_placement_and_family():
    expect = {
        ("bert", "pfeiffer"): [f"bert.encoder.layer.{i}.output.LayerNorm.<input>" for i in (0, 1)],
        ("bert", "houlsby"): ["bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
                              "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"],
        ("bert", "parallel"): ["bert.encoder.layer.0.output.<input>", "bert.encoder.layer.1.output.<input>"],
        ("gpt2", "pfeiffer"): ["transformer.h.0", "transformer.h.1"],
        ("gpt2", "houlsby"): ["transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_proj",
                              "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_proj"],
        ("gpt2", "parallel"): ["transformer.h.0.mlp", "transformer.h.1.mlp"],
        ("llama", "pfeiffer"): ["model.layers.0", "model.layers.1"],
        ("llama", "parallel"): ["model.layers.0.mlp", "model.layers.1.mlp"],
        ("t5", "pfeiffer"): ["encoder.block.0", "encoder.block.1", "decoder.block.0", "decoder.block.1"],
        ("t5", "parallel"): [f"{s}.block.{i}.layer.{j}.DenseReluDense" for s, j in (("encoder", 1), ("decoder", 2))
                             for i in (0, 1)],
    }
    for (family, placement), sites in expect.items():
        report = pm.Modular(make_host(family)).add("a", Adapter(placement=placement))
        assert sorted(report.sites) == sorted(sites), (family, placement)
    t5 = pm.Modular(make_host("t5")).add("a", Adapter(placement="houlsby"))
    assert len(t5.sites) == 10 and any("EncDecAttention.o" in s for s in t5.sites)


def test_parameter_count_and_bottleneck():
    model = pm.Modular(make_host("gpt2"))
    report = model.add("a", Adapter(reduction=8))  # D = 32 -> r = 4 at two block outputs
    part = model["a"].part("transformer.h.0")
    assert part.down.weight.shape == (4, 32) and part.up.weight.shape == (32, 4)
    assert report.trainable_parameters == 2 * (32 * 4 + 4 + 4 * 32 + 32)
    assert pm.Modular(make_host("gpt2")).add("b", Adapter(placement="parallel")).trainable_parameters == 2 * (
        32 * 16 + 16 + 16 * 32 + 32)  # parallel default reduction 2


def test_houlsby_bert_matches_hand_computation():
    host, reference, model = _attached("bert", Adapter(placement="houlsby"))
    for name, layer in _layers(reference, "output.dense"):
        part = model["a"].part(name)
        parent = reference.get_submodule(name.rsplit(".", 1)[0])
        parent.dense = _After(layer, lambda y, p=part: _ref(p, y, F.silu))
    batch = make_batch("bert")
    torch.testing.assert_close(logits(host, batch), logits(reference, batch), rtol=1e-5, atol=1e-6)


def test_pfeiffer_bert_reapplies_the_host_layernorm():
    """Pfeiffer on post-LN BERT: LN(z + f(LN(z))) with z = h + a, the FFN output plus its residual."""
    host, reference, model = _attached("bert", Adapter())

    class Pfeiffer(nn.Module):
        def __init__(self, ln, part):
            super().__init__()
            self.ln, self.part = ln, part

        def forward(self, z):
            return self.ln(z + _ref(self.part, self.ln(z)))

    for name, ln in _layers(reference, "output.LayerNorm"):
        if "attention" not in name:
            reference.get_submodule(name.rsplit(".", 1)[0]).LayerNorm = Pfeiffer(ln, model["a"].part(name + ".<input>"))
    batch = make_batch("bert")
    torch.testing.assert_close(logits(host, batch), logits(reference, batch), rtol=1e-5, atol=1e-6)


def test_parallel_bert_adds_to_the_ffn_output():
    """Parallel on BERT: LN(FFN(a) + s·f(a) + a), a the FFN input (eval mode: dropout off)."""
    host, reference, model = _attached("bert", Adapter(placement="parallel"))

    class Parallel(nn.Module):
        def __init__(self, out, part):
            super().__init__()
            self.out, self.part = out, part

        def forward(self, hidden, a):
            return self.out.LayerNorm(self.out.dense(hidden) + _ref(self.part, a) + a)

    for i, layer in enumerate(reference.bert.encoder.layer):
        part = model["a"].part(f"bert.encoder.layer.{i}.output.<input>")
        assert part.scaling == 4.0
        layer.output = Parallel(layer.output, part)
    batch = make_batch("bert")
    torch.testing.assert_close(logits(host, batch), logits(reference, batch), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_pfeiffer_pre_ln_acts_on_block_output(family):
    host, reference, model = _attached(family, Adapter())
    for name, part in model["a"].items():
        parent, child = name.rsplit(".", 1)
        container = reference.get_submodule(parent)
        container[int(child)] = _After(container[int(child)], lambda y, p=part: _ref(p, y))
    batch = make_batch(family)
    torch.testing.assert_close(logits(host, batch), logits(reference, batch), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_parallel_pre_ln_reads_the_ffn_input(family):
    host, reference, model = _attached(family, Adapter(placement="parallel"))

    class Beside(nn.Module):
        def __init__(self, mlp, part):
            super().__init__()
            self.mlp, self.part = mlp, part

        def forward(self, x):
            return self.mlp(x) + _ref(self.part, x)

    for name in model["a"].sites:
        block = reference.get_submodule(name.rsplit(".", 1)[0])
        block.mlp = Beside(block.mlp, model["a"].part(name))
    batch = make_batch(family)
    torch.testing.assert_close(logits(host, batch), logits(reference, batch), rtol=1e-5, atol=1e-5)


def test_stacked_pfeiffer_adapters_compose_on_the_pre_norm_stream():
    """Stack(a, b) on BERT: z₁ = z + f_a(LN z), out = LN(z₁ + f_b(LN z₁)) — MAD-X / adapters' Stack."""
    host = make_host("bert")
    reference = copy.deepcopy(host)
    model = pm.Modular(host)
    model.add("a", Adapter())
    model.add("b", Adapter(reduction=8))
    randomize(model["a"], std=0.3)
    randomize(model["b"], std=0.3)
    model.use(pm.Stack("a", "b"))

    class Two(nn.Module):
        def __init__(self, ln, pa, pb):
            super().__init__()
            self.ln, self.pa, self.pb = ln, pa, pb

        def forward(self, z):
            z1 = z + _ref(self.pa, self.ln(z))
            return self.ln(z1 + _ref(self.pb, self.ln(z1)))

    for name, ln in _layers(reference, "output.LayerNorm"):
        if "attention" not in name:
            site = name + ".<input>"
            reference.get_submodule(name.rsplit(".", 1)[0]).LayerNorm = Two(ln, model["a"].part(site),
                                                                             model["b"].part(site))
    batch = make_batch("bert")
    torch.testing.assert_close(logits(host, batch), logits(reference, batch), rtol=1e-5, atol=1e-6)


def test_inits():
    zero = Adapter().build_part(pm.Site("x", "block", 32, 32), None)
    assert torch.count_nonzero(zero.up.weight) == 0 and torch.count_nonzero(zero.down.weight) > 0
    houlsby = Adapter(init="houlsby").build_part(pm.Site("x", "block", 32, 32), None)
    assert 0 < houlsby.up.weight.abs().max() <= 0.02
    bert = Adapter(init="bert").build_part(pm.Site("x", "block", 32, 32), None)
    assert bert.up.weight.abs().max() > 0.02


def test_config_defaults_and_errors():
    assert (Adapter().activation, Adapter().reduction, Adapter().scaling) == ("relu", 16.0, 1.0)
    assert Adapter(placement="houlsby").activation == "silu"
    assert (Adapter(placement="parallel").reduction, Adapter(placement="parallel").scaling) == (2.0, 4.0)
    with pytest.raises(pm.ConfigError, match="placement must be one of"):
        Adapter(placement="sideways")
    with pytest.raises(pm.ConfigError, match="reduction must be a positive number, got 0"):
        Adapter(reduction=0)
    with pytest.raises(pm.ConfigError, match="activation must be one of"):
        Adapter(activation="swish2")
    with pytest.raises(pm.ConfigError, match=r"dropout must be in \[0, 1\)"):
        Adapter(dropout=1.0)
    with pytest.raises(pm.IncompatibleHostError, match="token ids at an embedding"):
        pm.Modular(make_host("gpt2")).add("a", Adapter(placement="parallel", sites="embed"))


def test_explicit_sites_override_the_placement():
    model = pm.Modular(make_host("llama"))
    report = model.add("a", Adapter(placement="houlsby", sites="ffn.out"))
    assert report.sites == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
