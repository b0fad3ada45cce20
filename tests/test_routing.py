"""Routers: weights, auxiliary losses, statistics, gradients; each against a hand computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

import polymod as pm
from polymod.compose import Mix
from polymod.routing import (
    AttentionFusion,
    HashRouter,
    Polytropon,
    SoftmaxGate,
    SpanRouter,
    TopK,
    registered_routers,
    router_from_json,
)
from polymod.sites import Site
from tests.hosts import make_batch, make_host, randomize

CTX = SimpleNamespace(attention_mask=None, task=None, names=None, spans=None, token_ids=None)


def _bound(router, num=4, width=8):
    router.bind([f"e{i}" for i in range(num)], [Site("s", "linear", width, width)], None)
    return router


def _model(names=("a", "b", "c"), family="llama", sites="linear"):
    host = make_host(family)
    model = pm.Modular(host)
    for i, n in enumerate(names):
        model.add(n, pm.LoRA(rank=4, sites=sites))
        torch.manual_seed(20 + i)
        randomize(model[n], std=0.1)
    return host, model


def test_topk_weights_select_k_and_normalise():
    router = _bound(TopK(k=2))
    x = torch.randn(5, 3, 8)
    w = router.weights(CTX, "s", x, x)
    assert w.shape == (5, 3, 4)
    assert torch.all((w > 0).sum(-1) == 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(5, 3))
    probs = torch.softmax(router.site_params("s")(x), -1)
    top = probs.topk(2, -1)
    torch.testing.assert_close(w.gather(-1, top.indices), top.values / top.values.sum(-1, keepdim=True))
    one = _bound(TopK(k=1))
    w1 = one.weights(CTX, "s", x, x)
    torch.testing.assert_close(w1.max(-1).values, torch.softmax(one.site_params("s")(x), -1).max(-1).values)


def _collapsed(router, num=4, width=8):
    _bound(router, num, width)
    with torch.no_grad():
        router.site_params("s").weight.zero_()
        router.site_params("s").weight[0, 0] = 5.0  # expert 0 wins whenever x₀ > 0
    x = torch.randn(64, width)
    x[:, 0] = x[:, 0].abs() + 0.5
    return x


def test_capacity_drops_overflowing_assignments_and_counts_them():
    router = TopK(k=1, capacity_factor=1.0)
    x = _collapsed(router)
    w = router.weights(CTX, "s", x, x)
    capacity = math.ceil(1.0 * 64 * 1 / 4)
    assert int((w[:, 0] > 0).sum()) == capacity, "first-come tokens fill expert 0's capacity"
    assert torch.all(w[capacity:].sum(-1) == 0) and torch.all(w[:capacity, 0] > 0)
    stats = router.stats.summary()
    assert stats["dropped"] == 64 - capacity and stats["drop_rate"] == pytest.approx((64 - capacity) / 64)


def test_renormalize_overflow_gives_kept_experts_full_weight():
    router = TopK(k=2, capacity_factor=0.5, overflow="renormalize")
    x = _collapsed(router)
    w = router.weights(CTX, "s", x, x)
    kept = w.sum(-1)
    assert torch.all((kept[kept > 0] - 1).abs() < 1e-5), "a token's kept experts share its whole weight"
    assert int((w > 0).sum(-1).lt(2).sum()) > 0, "some tokens lost an expert to capacity"
    dropping = TopK(k=2, capacity_factor=0.5, overflow="drop")
    x2 = _collapsed(dropping)
    assert dropping.weights(CTX, "s", x2, x2).sum(-1).min() < 0.99


def test_load_balance_and_z_loss_match_their_formulas():
    router = TopK(k=1, balance_coef=0.5, z_coef=0.25)
    x = _collapsed(router)
    router.begin_forward()
    router.weights(CTX, "s", x, x)
    logits = router.site_params("s")(x)
    probs = torch.softmax(logits, -1)
    share = torch.nn.functional.one_hot(probs.argmax(-1), 4).float().mean(0)
    want_balance = 0.5 * 4 * (share * probs.mean(0)).sum()
    want_z = 0.25 * torch.logsumexp(logits, -1).pow(2).mean()
    torch.testing.assert_close(router.aux_losses["load_balance"], want_balance)
    torch.testing.assert_close(router.aux_losses["z_loss"], want_z)
    torch.testing.assert_close(router.aux_loss(), want_balance + want_z)


def test_load_balancing_loss_spreads_a_collapsed_router():
    router = TopK(k=1, balance_coef=1.0, z_coef=0.0)
    x = _collapsed(router)
    opt = torch.optim.SGD(router.parameters(), lr=1.0)
    start = router.weights(CTX, "s", x, x).gt(0).float().mean(0).max()
    for _ in range(60):
        router.begin_forward()
        router.weights(CTX, "s", x, x)
        opt.zero_grad()
        router.aux_loss().backward()
        opt.step()
    end = router.weights(CTX, "s", x, x).gt(0).float().mean(0).max()
    assert start > 0.95 and end < 0.6, (float(start), float(end))


@pytest.mark.slow
def test_load_balancing_lowers_max_expert_share_on_a_toy_task():
    shares = {}
    for coef in (0.0, 1.0):
        torch.manual_seed(0)
        host, model = _model(names=("a", "b", "c", "d"), sites="ffn.out")
        router = TopK(k=1, balance_coef=coef, z_coef=0.0)
        model.use(Mix(["a", "b", "c", "d"], router=router))
        batch = make_batch("llama", batch=8, length=12)
        seen = {}
        layers = dict(host.named_modules())
        def keep(s, seen=seen):
            return lambda m, a: seen.__setitem__(s, a[0].mean((0, 1)))

        hooks = [layers[s].register_forward_pre_hook(keep(s)) for s in model["a"].sites]
        with torch.no_grad():
            host(**batch)
            for s, mean in seen.items():  # start collapsed: expert a wins for the average input
                router.site_params(s).weight[0] += 2 * mean / mean.pow(2).sum()
        for h in hooks:
            h.remove()
        opt = torch.optim.Adam(list(model.trainable_parameters()), lr=3e-2)
        for _ in range(40):
            out = host(**batch, labels=batch["input_ids"])
            aux = model.aux_loss()
            loss = out.loss if aux is None else out.loss + aux
            opt.zero_grad()
            loss.backward()
            opt.step()
        router.stats.reset()
        with torch.no_grad():
            host(**batch)
        shares[coef] = router.stats.summary()["max_share"]
    assert shares[0.0] > 0.8 and shares[1.0] < shares[0.0] - 0.2, shares


def test_aux_loss_is_collected_per_forward_and_stats_are_visible():
    host, model = _model()
    model.use(Mix(["a", "b", "c"], router=TopK(k=2)))
    batch = make_batch("llama")
    host(**batch)
    first = model.aux_loss()
    host(**batch)
    torch.testing.assert_close(model.aux_loss(), first)  # reset at each forward, not accumulated
    assert first.requires_grad
    (stats,) = model.routing_stats().values()
    assert set(stats["load"]) == {"a", "b", "c"} and sum(stats["load"].values()) == pytest.approx(1.0, abs=1e-5)
    model.use("a")
    assert model.aux_loss() is None


def test_zero_initialised_softmax_gate_is_uniform_with_maximal_entropy():
    host, model = _model()
    gate = SoftmaxGate(level="example")
    model.use(Mix(["a", "b", "c"], router=gate))
    with torch.no_grad():
        host(**make_batch("llama"))
    stats = gate.stats.summary()
    assert stats["entropy"] == pytest.approx(math.log(3), abs=1e-5)
    assert stats["max_share"] == pytest.approx(1 / 3, abs=1e-5)


@pytest.mark.parametrize("router", [SoftmaxGate(), TopK(k=2), AttentionFusion()])
def test_gradients_reach_router_and_active_modules_only(router):
    host, model = _model(names=("a", "b", "idle"))
    aggregate = "attention" if isinstance(router, AttentionFusion) else "sum"
    model.use(Mix(["a", "b"], router=router, aggregate=aggregate))
    out = host(**make_batch("llama")).logits
    loss = out.pow(2).mean() + (model.aux_loss() or 0)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in router.parameters())
    for n in ("a", "b"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model[n].parameters())
    assert all(p.grad is None for p in model["idle"].parameters())
    assert all(p.grad is None for p in host.parameters())
    assert set(map(id, router.parameters())) <= set(map(id, model.trainable_parameters()))


def test_attention_fusion_with_identity_values_equals_its_weighted_sum():
    host, model = _model(names=("a", "b"))
    batch = make_batch("llama")
    fusion = AttentionFusion(temperature=0.5)
    model.use(Mix(["a", "b"], router=fusion, aggregate="attention"))
    with torch.no_grad():
        attention = host(**batch).logits
    model.use(Mix(["a", "b"], router=fusion, aggregate="sum"))  # same router, V unused
    with torch.no_grad():
        summed = host(**batch).logits
    torch.testing.assert_close(attention, summed, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        for site in fusion.per_site.values():
            site.value.weight.mul_(0.5)
    model.use(Mix(["a", "b"], router=fusion, aggregate="attention"))
    with torch.no_grad():
        assert not torch.allclose(host(**batch).logits, summed, atol=1e-4)


def test_hash_router_sends_each_token_to_its_hashed_expert():
    host, model = _model(names=("a", "b"))
    batch = make_batch("llama", batch=2)
    router = HashRouter(seed=3)
    model.use(Mix(["a", "b"], router=router))
    with torch.no_grad():
        hashed = host(**batch).logits
    experts = router.expert_of(batch["input_ids"])
    assert 0 < experts.float().mean() < 1, "both experts get tokens"
    spans = [[(t, t + 1, ["a", "b"][int(e)]) for t, e in enumerate(row)] for row in experts]
    model.use(Mix(["a", "b"], router=SpanRouter()))
    with torch.no_grad(), model.route(spans=spans):
        spanned = host(**batch).logits
    torch.testing.assert_close(hashed, spanned, rtol=1e-5, atol=1e-5)


def test_span_router_over_whole_rows_equals_per_row_routing():
    host, model = _model()
    batch = make_batch("llama", batch=3, length=6)
    model.use(Mix(["a", "b", "c"], router=SpanRouter(default="a")))
    with torch.no_grad(), model.route(spans=[[(0, 6, "c")], [], [(0, 6, None)]]):
        spanned = host(**batch).logits
    model.use(None)
    with torch.no_grad(), model.route(["c", "a", None]):
        rows = host(**batch).logits
    torch.testing.assert_close(spanned, rows, rtol=1e-5, atol=1e-5)


def test_polytropon_weights_follow_the_allocation_matrix():
    router = _bound(Polytropon(n_tasks=3, heads=2), num=4)
    router.eval()
    ctx = SimpleNamespace(task=torch.tensor([2, 0]))
    table = router.site_params("s").logits
    with torch.no_grad():
        table.normal_()
    w = router.weights(ctx, "s", None, torch.zeros(2, 1))
    z = torch.sigmoid(table[torch.tensor([2, 0])])
    torch.testing.assert_close(w, z / z.sum(-1, keepdim=True))
    router.train()
    a, b = router.weights(ctx, "s", None, torch.zeros(2, 1)), router.weights(ctx, "s", None, torch.zeros(2, 1))
    assert w.shape == a.shape == (2, 2, 4) and not torch.allclose(a, b), "Gumbel-sigmoid samples in training"
    torch.testing.assert_close(a.sum(-1), torch.ones(2, 2))
    (a * torch.arange(4.0)).sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0
    with pytest.raises(pm.StateError, match="route\\(task=ids\\)"):
        router.weights(SimpleNamespace(task=None), "s", None, torch.zeros(2, 1))


def test_routers_round_trip_through_json():
    routers = [TopK(k=2, capacity_factor=1.25, overflow="renormalize", noise=0.1), SoftmaxGate("example", 0.5),
               Polytropon(n_tasks=4, heads=2, per_site=False), HashRouter(seed=7), AttentionFusion(2.0),
               SpanRouter(default="a")]
    for r in routers:
        back = router_from_json(r.to_json())
        assert type(back) is type(r) and back.config() == r.config()
    assert {"topk", "softmax", "polytropon", "hash", "attention", "static", "task", "example", "span"} <= set(
        registered_routers())


def test_learned_routers_refuse_token_id_inputs():
    router = _bound(SoftmaxGate())
    with pytest.raises(pm.StateError, match="takes token ids"):
        router.weights(CTX, "s", torch.tensor([[1, 2]]), torch.zeros(1, 2, 8))


def test_hash_routing_at_t5_cross_attention_hashes_the_encoder_tokens():
    host, model = _model(names=("a", "b"), family="t5", sites="attn.k|attn.v")
    batch = make_batch("t5")  # encoder 7 tokens, decoder 4: cross-attention k/v see the encoder's 7
    router = HashRouter()
    model.use(Mix(["a", "b"], router=router))
    with torch.no_grad():
        host(**batch)
    encoder, decoder = batch["input_ids"].numel(), batch["decoder_input_ids"].numel()
    # global routing: hashed once per forward per token sequence, reused by all 12 k/v sites
    assert router.stats.summary()["units"] == encoder + decoder
