"""Prefix tuning: the cache path against a hand-built cache, GQA, generate(), folding and refusals."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import polymod as pm
from polymod.modules.prefix import PrefixTuning, fold
from polymod.modules.prompt import PromptTuning
from tests.decode import generate_matches_greedy, greedy_without_cache, left_padded
from tests.hosts import make_batch, make_host, randomize


def _attach(family: str, spec: PrefixTuning | None = None):
    host = make_host(family)
    model = pm.Modular(host)
    model.add("p", spec or PrefixTuning(length=3))
    model.use("p")
    return host, model


def test_gqa_prefix_has_kv_heads_and_equals_a_hand_built_cache():
    host, model = _attach("llama")  # 4 query heads, 2 key/value heads, head width 8, 2 layers
    part = model["p"].part("<input>")
    assert part.prefix.shape == (3, 2 * 2 * 2 * 8)  # (n, L·2·H_kv·d)
    batch = make_batch("llama")
    batch["attention_mask"][0, :2] = 0
    out = host(**batch, use_cache=True)
    assert out.cache.layers[0].keys.shape == (3, 2, 3 + 7, 8)  # (B, H_kv, n + T, d)
    kv = part.prefix.view(3, 2, 2, 2, 8)  # (n, L, 2, H_kv, d)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(kv[:, layer, 0].transpose(0, 1).expand(3, -1, -1, -1),
                     kv[:, layer, 1].transpose(0, 1).expand(3, -1, -1, -1), layer)
    model.use(None)
    mask = torch.cat([torch.ones(3, 3, dtype=torch.long), batch["attention_mask"]], 1)
    expected = host(input_ids=batch["input_ids"], attention_mask=mask, cache=cache).logits
    torch.testing.assert_close(out.logits, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_with_cache_equals_greedy_without_cache(family):
    host, model = _attach(family)
    randomize(model["p"], std=1.0)
    batch = left_padded(make_batch(family, batch=2, length=6)) if family != "t5" else make_batch(family, 2, 6)
    batch.pop("decoder_input_ids", None)
    logits = generate_matches_greedy(host, batch)
    model.use(None)
    _, plain = greedy_without_cache(host, batch, 4)
    assert not torch.allclose(logits, plain, atol=1e-3), "the prefix must act"


def test_prefix_and_prompt_stacked_under_generate():
    host = make_host("llama")
    model = pm.Modular(host)
    model.add("prefix", PrefixTuning(length=2))
    model.add("prompt", PromptTuning(length=3))
    model.use(pm.Stack("prefix", "prompt"))  # the prompt must see the prefilled cache as a first step
    out = host(**make_batch("llama"), use_cache=True)
    assert out.logits.shape[1] == 3 + 7 and out.cache.get_seq_length() == 2 + 3 + 7
    generate_matches_greedy(host, make_batch("llama", batch=2, length=5))


def test_bert_prefix_reaches_every_layer_and_respects_padding():
    host, model = _attach("bert")
    batch = make_batch("bert")
    batch["attention_mask"][0, -2:] = 0
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, -2:] = 5
    torch.testing.assert_close(host(**batch).logits, host(**changed).logits, rtol=0, atol=1e-6)
    before = host(**batch).logits
    with torch.no_grad():
        model["p"].part("<input>").prefix.view(3, 2, 2, -1)[:, 1] += 1.0  # the second layer's prefix only
    assert not torch.allclose(host(**batch).logits, before, atol=1e-4)


def test_reparametrised_prefix_folds_to_plain_prefixes(tmp_path):
    host, model = _attach("gpt2", PrefixTuning(length=3, projection=16))
    batch = make_batch("gpt2")
    expected = host(**batch).logits
    folded = fold(model["p"])
    assert folded.spec.projection is None and folded.card.lineage.recipe == {"method": "fold", "projection": 16}
    assert folded.num_parameters() == 3 * 2 * 2 * 32
    pm.save(folded, tmp_path / "f")
    model.add("f", pm.load(tmp_path / "f"))
    model.use("f")
    torch.testing.assert_close(host(**batch).logits, expected, rtol=0, atol=1e-6)
    with pytest.raises(pm.ConfigError, match="takes a prefix module"):
        fold(_lora_module())


def _lora_module():
    model = pm.Modular(make_host("gpt2"))
    model.add("l", pm.LoRA(rank=2))
    return model["l"]


def test_t5_prefix_is_on_the_decoder_and_the_encoder_is_refused():
    host, model = _attach("t5")
    assert list(model["p"].sites) == ["decoder.<input>"]
    with pytest.raises(pm.IncompatibleHostError, match="discard any key/value cache"):
        model.add("enc", PrefixTuning(sites="encoder.<input>"))


def test_refusals_and_config_errors():
    model = pm.Modular(make_host("llama"))
    with pytest.raises(pm.IncompatibleHostError, match="call carrying the attention cache"):
        model.add("x", PrefixTuning(sites="attn.v"))
    with pytest.raises(pm.ConfigError, match="positive integer"):
        PrefixTuning(length=0)
    with pytest.raises(pm.ConfigError, match="projection must be"):
        PrefixTuning(projection=0)
    model.add("p", PrefixTuning())
    with pytest.raises(pm.CompositionError, match="cannot be weighted"):
        model["p"].part("<input>").add_into(model.host, dict(make_batch("llama")), weight=0.5)


def test_gradient_checkpointing_on_gpt2_is_refused():
    host, _ = _attach("gpt2")
    host.activation_checkpointing_enable()
    host.train()
    with pytest.raises(pm.StateError, match="gradient checkpointing"):
        host(**make_batch("gpt2"))
