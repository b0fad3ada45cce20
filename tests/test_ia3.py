"""IA³: the math against a direct computation, merging with biases, sites per family, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import polymod as pm
from polymod.modules.ia3 import IA3
from tests.hosts import make_batch, make_host


class Toy(nn.Module):
    """k (Linear, biased), an FFN fc1 → GELU → fc2 (Linear), and a GPT-2-style Conv1D pair."""

    def __init__(self):
        super().__init__()
        self.k = nn.Linear(6, 5)
        self.fc1, self.fc2 = nn.Linear(5, 7), nn.Linear(7, 5)
        self.c_fc, self.c_proj = Conv1D(9, 5), Conv1D(5, 9)
        with torch.no_grad():
            for m in (self.c_fc, self.c_proj):
                m.weight.normal_(0, 0.3)
                m.bias.normal_(0, 0.3)
            for m in (self.k, self.fc1, self.fc2):
                m.bias.normal_(0, 0.3)  # non-zero biases, so scaling them is tested

    def forward(self, x):
        h = self.k(x)
        h = self.fc2(nn.functional.gelu(self.fc1(h)))
        return self.c_proj(nn.functional.gelu(self.c_fc(h)))


def _toy_model():
    torch.manual_seed(3)
    host = Toy().eval()
    model = pm.Modular(host)
    model.add("m", IA3(sites="k|fc2|c_fc|c_proj", feedforward="fc2|c_proj"))
    with torch.no_grad():
        for p in model["m"].parameters():
            p.uniform_(0.5, 1.5)
    model.use("m")
    return host, model


def _direct(host: Toy, scale: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The IA³ equations computed by hand from the raw weights (no hooks, no polymod)."""
    k = (x @ host.k.weight.T + host.k.bias) * scale["k"]  # output scaling, bias included
    h = nn.functional.gelu(k @ host.fc1.weight.T + host.fc1.bias)
    h = (h * scale["fc2"]) @ host.fc2.weight.T + host.fc2.bias  # input scaling (the FFN intermediate activation)
    h = nn.functional.gelu((h @ host.c_fc.weight + host.c_fc.bias) * scale["c_fc"])  # Conv1D: y = x W + b
    return (h * scale["c_proj"]) @ host.c_proj.weight + host.c_proj.bias


def test_ia3_matches_direct_computation():
    host, model = _toy_model()
    scale = {site: part.scale.detach() for site, part in model["m"].items()}
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        torch.testing.assert_close(host(x), _direct(host, scale, x), rtol=1e-5, atol=1e-6)
    sizes = {site: part.scale.numel() for site, part in model["m"].items()}
    assert sizes == {"k": 5, "fc2": 7, "c_fc": 9, "c_proj": 9}  # output: D_out; input: D_in


def test_delta_weight_and_bias_are_the_scaled_axes():
    host, model = _toy_model()
    parts = dict(model["m"].items())
    l_k, l_fc2 = parts["k"].scale.detach(), parts["fc2"].scale.detach()
    deltas = model["m"].delta(dict(host.named_modules()))
    torch.testing.assert_close(deltas["k"], (l_k - 1)[:, None] * host.k.weight)  # Linear rows
    torch.testing.assert_close(deltas["fc2"], host.fc2.weight * (l_fc2 - 1)[None, :])  # Linear columns
    torch.testing.assert_close(deltas["c_fc"], host.c_fc.weight * (parts["c_fc"].scale.detach() - 1)[None, :])
    torch.testing.assert_close(deltas["c_proj"], (parts["c_proj"].scale.detach() - 1)[:, None] * host.c_proj.weight)
    torch.testing.assert_close(parts["k"].delta_bias(host.k), (l_k - 1) * host.k.bias)
    assert parts["fc2"].delta_bias(host.fc2) is None  # scaling the input leaves the bias alone


def test_merge_with_biases_is_exact_and_unmerge_restores_bits():
    host, model = _toy_model()
    x = torch.randn(4, 6)
    before = {k: v.clone() for k, v in host.state_dict().items()}
    with torch.no_grad():
        unmerged = host(x)
        model.merge_into_host("m")
        assert not torch.equal(host.k.bias, before["k.bias"]), "merging an output scaling scales the bias"
        assert torch.equal(host.fc2.bias, before["fc2.bias"])
        torch.testing.assert_close(host(x), unmerged, rtol=1e-5, atol=1e-6)
        model.unmerge("m")
    for k, v in host.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_weighted_add_into_equals_weighted_delta():
    host, model = _toy_model()
    x, y = torch.randn(2, 3, 7), torch.randn(2, 3, 5)
    part = model["m"].part("fc2")
    with torch.no_grad():
        torch.testing.assert_close(part.add_into(x, y, 0.3), y + 0.3 * part(x, y))
        out = model["m"].part("k")
        torch.testing.assert_close(out.add_into(x[..., :6], y, 0.3), y + 0.3 * out(x[..., :6], y))


@pytest.mark.parametrize(
    "family,inputs,outputs",
    [
        ("bert", ["bert.encoder.layer.0.output.dense"], ["bert.encoder.layer.0.attention.self.key"]),
        ("gpt2", ["transformer.h.0.mlp.c_proj"], ["transformer.h.0.attn.c_attn"]),
        # gated FFN: the intermediate activation is scaled at up_proj's output (gated_ffn="up")
        ("llama", [], ["model.layers.0.self_attn.k_proj", "model.layers.0.mlp.up_proj"]),
        ("t5", ["encoder.block.0.layer.1.DenseReluDense.wo"], ["decoder.block.0.layer.1.EncDecAttention.v"]),
    ],
)
def test_default_sites_per_family(family, inputs, outputs):
    model = pm.Modular(make_host(family))
    report = model.add("m", IA3())
    module = model["m"]
    for site in inputs:
        assert module.part(site).scales_input, site
    for site in outputs:
        assert not module.part(site).scales_input, site
    assert not any(".attention.output.dense" in s or s.endswith((".q_proj", "down_proj")) for s in report.sites)
    if family == "gpt2":  # fused q, k, v: the vector has 3·D entries and the report says so
        assert module.part("transformer.h.0.attn.c_attn").scale.numel() == 3 * 32
        assert any("fuses q, k and v" in n for n in report.notes)
    if family == "llama":  # the intermediate activation is 48 wide
        assert module.part("model.layers.0.mlp.up_proj").scale.numel() == 48


def _gated_t5() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.T5Config(d_model=32, num_layers=1, num_decoder_layers=1, num_heads=4, d_kv=8, d_ff=48, vocab_size=96,
                      feed_forward_proj="gated-gelu", decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return tf.T5ForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("family", ["llama", "t5-gated"])
def test_gated_ffn_up_and_down_placements_are_the_same_function(family):
    """down(act(gate x) ⊙ (l ⊙ up x)) = down(l ⊙ (act(gate x) ⊙ up x)): same vectors, same logits."""
    ffn = "mlp" if family == "llama" else "DenseReluDense"
    out_name, up_name = (f"{ffn}.down_proj", f"{ffn}.up_proj") if family == "llama" else (f"{ffn}.wo", f"{ffn}.wi_1")
    logits = {}
    for placement in ("down", "up"):
        host = make_host("llama") if family == "llama" else _gated_t5()
        model = pm.Modular(host)
        report = model.add("m", IA3(gated_ffn=placement))
        assert any(s.endswith(out_name if placement == "down" else up_name) for s in report.sites)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, part in sorted(model["m"].items(), key=lambda kv: kv[0].replace(up_name, out_name)):
                part.scale.copy_(0.5 + torch.rand(part.scale.shape, generator=g))
        model.use("m")
        batch = make_batch("t5" if family != "llama" else "llama")
        with torch.no_grad():
            logits[placement] = host(**batch).logits
        assert sum(p.scales_input for _, p in model["m"].items()) == (0 if placement == "up" else len(
            [s for s in report.sites if s.endswith(out_name)]))
    torch.testing.assert_close(logits["up"], logits["down"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("gated_ffn,inputs", [("up", 0), ("down", 2)])
def test_load_rederives_which_sites_scale_their_input(tmp_path, gated_ffn, inputs):
    model = pm.Modular(make_host("llama"))
    model.add("m", IA3(gated_ffn=gated_ffn))
    pm.save(model["m"], tmp_path / "m")
    loaded = pm.load(tmp_path / "m")
    assert list(loaded.sites) == list(model["m"].sites)
    assert {s: p.scales_input for s, p in loaded.items()} == {s: p.scales_input for s, p in model["m"].items()}
    assert sum(p.scales_input for _, p in loaded.items()) == inputs  # one down_proj per layer with "down"


def test_errors():
    model = pm.Modular(make_host("llama"))
    with pytest.raises(pm.IncompatibleHostError, match="IA3 scales linear layers.*not a embedding"):
        model.add("e", IA3(sites="embed", feedforward=""))
    with pytest.raises(pm.ConfigError, match="cannot be decided from a site name"):
        IA3(feedforward="linear")
    with pytest.raises(pm.ConfigError, match="feedforward must be a selection string"):
        IA3(feedforward=None)
    with pytest.raises(pm.ConfigError, match="gated_ffn must be 'up' or 'down', got 'mid'"):
        IA3(gated_ffn="mid")
    part = IA3().build_part(pm.Site("x.mlp.down_proj", "linear", 4, 3), None)
    with pytest.raises(pm.StateError, match="not attached to a host layer"):
        part.delta_weight()


def test_identity_at_init_on_a_host_and_trainable_budget():
    host = make_host("llama")
    batch = make_batch("llama")
    with torch.no_grad():
        before = host(**batch).logits
    model = pm.Modular(host)
    report = model.add("m", IA3())
    model.use("m")
    with torch.no_grad():
        assert torch.equal(host(**batch).logits, before)  # l = 1 exactly: y·1 and W·0 add nothing
    # k, v: 2 KV heads × 8 = 16 each; the FFN intermediate activation (at up_proj): 48; two layers
    assert report.trainable_parameters == 2 * (16 + 16 + 48)
