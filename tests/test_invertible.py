"""MAD-X invertible adapter: exact inverse, placement around the LM head, one shared coupling block."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.modules.invertible import Invertible, NICEBlock
from tests.hosts import logits, make_batch, make_host, randomize


@pytest.mark.parametrize("width,reduction,activation", [(32, 2.0, "relu"), (33, 4.0, "gelu"), (8, 1.0, "tanh")])
def test_inverse_is_exact(width, reduction, activation):
    block = NICEBlock(width, reduction, activation)
    randomize(block, std=0.5)
    x = torch.randn(3, 7, width)
    with torch.no_grad():
        y = block(x)
        assert (y - x).abs().max() > 0.1, "a random block must not be the identity"
        torch.testing.assert_close(block.inverse(y), x, rtol=0, atol=1e-5)
        torch.testing.assert_close(block(block.inverse(x)), x, rtol=0, atol=1e-5)


def _capture(layer: torch.nn.Module, store: dict, key: str, inputs: bool) -> None:
    if inputs:
        def pre(m, args, kwargs):  # polymod's input-site hook passes the call by keyword
            store[key] = (args[0] if args else next(iter(kwargs.values()))).detach().clone()

        layer.register_forward_pre_hook(pre, with_kwargs=True)
    else:
        layer.register_forward_hook(lambda m, args, out: store.__setitem__(key, out.detach().clone()))


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_forward_after_embeddings_inverse_before_the_head(family):
    host = make_host(family)
    model = pm.Modular(host)
    report = model.add("inv", Invertible())
    head = host.get_output_embeddings()
    assert any(s.endswith(".<input>") for s in report.sites)
    randomize(model["inv"], std=0.3)
    model.use("inv")
    seen: dict = {}
    embed = host.get_input_embeddings() if family != "t5" else host.decoder.embed_tokens
    _capture(embed, seen, "embed", inputs=False)  # registered after polymod's hook: sees the coupled output
    _capture(head, seen, "head_in", inputs=True)  # registered after polymod's pre-hook: sees the inverted input
    final = {"gpt2": lambda: host.transformer.ln_f, "llama": lambda: host.model.norm,
             "t5": lambda: host.decoder.final_layer_norm}[family]()
    _capture(final, seen, "final", inputs=False)
    batch = make_batch(family)
    logits(host, batch)
    block = next(part for _, part in model["inv"].items() if part.owns).block
    scale = 32**-0.5 if family == "t5" else 1.0  # T5 scales the tied head's input by D^-1/2
    with torch.no_grad():
        ids = batch["decoder_input_ids" if family == "t5" else "input_ids"]
        torch.testing.assert_close(seen["embed"], block(torch.nn.functional.embedding(ids, embed.weight)),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(seen["head_in"], block.inverse(seen["final"] * scale), rtol=0, atol=1e-6)
        torch.testing.assert_close(block(seen["head_in"]), seen["final"] * scale, rtol=0, atol=1e-5)


def test_one_block_shared_by_every_site_and_saved_once(tmp_path):
    host = make_host("t5")
    model = pm.Modular(host)
    report = model.add("inv", Invertible())
    assert sorted(report.sites) == ["decoder.embed_tokens", "encoder.embed_tokens", "lm_head.<input>"]
    module = model["inv"]
    blocks = {id(part._block()) for _, part in module.items()}
    assert len(blocks) == 1
    assert report.trainable_parameters == 2 * (16 * 8 + 8 + 8 * 16 + 16)  # F and G: 16 -> 8 -> 16
    randomize(module, std=0.3)
    model.use("inv")
    batch = make_batch("t5")
    expected = logits(host, batch)
    pm.save(module, tmp_path / "inv")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "inv" / "weights.safetensors"))
    assert len(keys) == 8 and len({k.split(":")[0] for k in keys}) == 1
    model.use(None)
    model.add("loaded", pm.load(tmp_path / "inv"))
    model.use("loaded")
    torch.testing.assert_close(logits(host, batch), expected, rtol=0, atol=1e-6)
    loaded = model["loaded"]
    assert len({id(part._block()) for _, part in loaded.items()}) == 1


def test_no_inverse_on_a_classifier_or_when_disabled():
    assert pm.Modular(make_host("bert")).add("a", Invertible()).sites == ["bert.embeddings.word_embeddings"]
    assert pm.Modular(make_host("gpt2")).add("a", Invertible(inverse=False)).sites == ["transformer.wte"]


def test_identity_round_trip_through_a_layerless_lm():
    """With no transformer layer between them, forward and inverse cancel: logits equal the bare host's."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=0, num_attention_heads=4, intermediate_size=48,
                         vocab_size=96, tie_word_embeddings=True)
    host = tf.LlamaForCausalLM(cfg).eval()
    host.model.norm = torch.nn.Identity()
    batch = make_batch("llama")
    before = logits(host, batch)
    model = pm.Modular(host)
    model.add("inv", Invertible())
    randomize(model["inv"], std=0.3)
    model.use("inv")
    after = logits(host, batch)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    model.use(None)
    model.add("plain", Invertible(inverse=False))
    randomize(model["plain"], std=0.3)
    model.use("plain")
    assert (logits(host, batch) - before).abs().max() > 1e-3, "the forward block alone must change the logits"


def test_errors():
    with pytest.raises(pm.ConfigError, match="reduction must be a positive number"):
        Invertible(reduction=-1)
    with pytest.raises(pm.ConfigError, match="init must be 'zero' or 'bert'"):
        Invertible(init="glow")
    with pytest.raises(pm.IncompatibleHostError, match="needs a forward site"):
        pm.Modular(make_host("gpt2")).add("a", Invertible(sites="lm_head.<input>", inverse=False))
