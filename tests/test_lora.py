"""LoRA: the maths against an independent computation, options, coexistence and training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import polymod as pm
from tests.hosts import assert_same_state, host_state, make_batch, make_host, randomize


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family,site", [("llama", "model.layers.0.self_attn.q_proj"),
                                         ("gpt2", "transformer.h.0.attn.c_attn")])
def test_linear_and_conv1d_math(family, site):
    host = make_host(family)
    model = pm.Modular(host)
    model.add("a", pm.LoRA(rank=3, alpha=6, sites=site))
    randomize(model["a"])
    model.use("a")
    layer = dict(host.named_modules())[site]
    part = model["a"].part(site)
    x = _x(2, 5, 32)
    w = layer.weight if family == "llama" else layer.weight.t()  # Conv1D stores (D_in, D_out)
    bias = layer.bias if layer.bias is not None else 0.0
    expected = x @ w.t() + bias + 2.0 * (x @ part.A.t() @ part.B.t())
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_embedding_math_and_delta_layout():
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("e", pm.LoRA(rank=2, sites="embed"))
    randomize(model["e"])
    model.use("e")
    emb = host.model.embed_tokens
    part = model["e"].part("model.embed_tokens")
    ids = torch.tensor([[3, 7, 9]])
    expected = F.embedding(ids, emb.weight) + part.A.t()[ids] @ part.B.t()
    torch.testing.assert_close(emb(ids), expected)
    assert part.delta_weight().shape == emb.weight.shape


def test_scaling_rslora_and_default_alpha():
    assert pm.LoRA(rank=8).scaling == 1.0
    assert pm.LoRA(rank=4, alpha=8).scaling == 2.0
    assert pm.LoRA(rank=16, alpha=8, rslora=True).scaling == pytest.approx(8 / math.sqrt(16))


@pytest.mark.parametrize("kwargs,match", [({"rank": 0}, "rank must be a positive integer, got 0"),
                                          ({"alpha": -1.0}, "alpha must be positive"),
                                          ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
                                          ({"init": "pissa"}, "init must be 'kaiming' or 'gaussian', got 'pissa'")])
def test_spec_validation(kwargs, match):
    with pytest.raises(pm.ConfigError, match=match):
        pm.LoRA(**kwargs)


def test_lora_refuses_block_sites():
    model = pm.Modular(make_host("llama"))
    with pytest.raises(pm.IncompatibleHostError, match="leaf layers"):
        model.add("b", pm.LoRA(sites="block.out"))


def test_dropout_only_in_training():
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("d", pm.LoRA(rank=4, dropout=0.5, sites="attn.q"))
    randomize(model["d"])
    model.use("d")
    batch = make_batch("llama")
    model.eval()
    with torch.no_grad():
        assert torch.equal(host(**batch).logits, host(**batch).logits)
    model.train()
    with torch.no_grad():
        assert not torch.equal(host(**batch).logits, host(**batch).logits)


def test_several_modules_on_one_site_only_active_act():
    host = make_host("llama")
    batch = make_batch("llama")
    model = pm.Modular(host)
    for name in ("a", "b"):
        model.add(name, pm.LoRA(rank=2, sites="attn.q|attn.v"))
        randomize(model[name])
    outs = {}
    with torch.no_grad():
        for expr in (None, "a", "b", pm.Stack("a", "b")):
            model.use(expr)
            outs[str(expr)] = host(**batch).logits
    assert not torch.allclose(outs["a"], outs["b"])
    # LoRA contributions add: (a+b) - host == (a - host) + (b - host) up to the host's non-linearity,
    # so check exactly at one site instead of at the logits.
    layer = host.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, 32)
    with torch.no_grad():
        model.use(None)
        y0 = layer(x)
        model.use("a")
        ya = layer(x)
        model.use("b")
        yb = layer(x)
        model.use(pm.Stack("a", "b"))
        yab = layer(x)
    torch.testing.assert_close(yab - y0, (ya - y0) + (yb - y0), rtol=1e-5, atol=1e-6)


def test_training_smoke_loss_falls_only_lora_changes():
    host = make_host("bert")
    state = host_state(host)
    model = pm.Modular(host)
    model.add("t", pm.LoRA(rank=4, sites="attn.q|attn.v|classifier"))
    model.use("t")
    before = {k: v.detach().clone() for k, v in model["t"].state_dict().items()}
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (16, 6), generator=g)
    labels = (ids[:, 0] > 48).long()  # a learnable rule on the first token
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(60):  # eval mode: the tiny host's dropout off, so the loss curve is deterministic
        loss = F.cross_entropy(host(input_ids=ids).logits, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    after = model["t"].state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith(".B"))
    assert_same_state(host, state)


def test_gradients_equal_an_explicit_computation():
    """The in-place fused update must give the same gradients as W x + s·B A x written out."""
    host = make_host("llama")
    model = pm.Modular(host)
    site = "model.layers.0.mlp.up_proj"
    model.add("a", pm.LoRA(rank=3, alpha=6, sites=site))
    randomize(model["a"])
    model.use("a")
    layer, part = dict(host.named_modules())[site], model["a"].part(site)
    x = _x(2, 5, 32).requires_grad_(True)
    layer(x).pow(2).sum().backward()
    got = (part.A.grad.clone(), part.B.grad.clone(), x.grad.clone())
    part.A.grad = part.B.grad = x.grad = None
    (x @ layer.weight.t() + 2.0 * (x @ part.A.t() @ part.B.t())).pow(2).sum().backward()
    for g, want in zip(got, (part.A.grad, part.B.grad, x.grad)):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-5)
