"""Prompt tuning: the rewritten call against hand-built inputs, labels, masks, stacking and generate()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import polymod as pm
from polymod.modules.prompt import PromptTuning
from tests.decode import generate_matches_greedy, greedy_without_cache, left_padded
from tests.hosts import make_batch, make_host, randomize


def _attach(family: str, spec: PromptTuning | None = None, name: str = "p"):
    host = make_host(family)
    model = pm.Modular(host)
    model.add(name, spec or PromptTuning(length=4))
    model.use(name)
    return host, model


def _prompt(model: pm.Modular, name: str = "p") -> torch.Tensor:
    site = "encoder.<input>" if "encoder.<input>" in model[name].sites else "<input>"
    return model[name].part(site).prompt


def test_bert_call_equals_hand_built_inputs_with_types_and_positions():
    host, model = _attach("bert")
    batch = {**make_batch("bert"), "token_type_ids": torch.ones(3, 7, dtype=torch.long),
             "position_ids": torch.arange(7).expand(3, 7)}
    batch["attention_mask"][1, -3:] = 0
    got = host(**batch).logits
    model.use(None)
    p = _prompt(model)  # (n, D)
    embeds = torch.cat([p.expand(3, -1, -1), host.get_input_embeddings()(batch["input_ids"])], dim=1)
    expected = host(inputs_embeds=embeds,
                    attention_mask=torch.cat([torch.ones(3, 4, dtype=torch.long), batch["attention_mask"]], 1),
                    token_type_ids=torch.cat([torch.zeros(3, 4, dtype=torch.long), batch["token_type_ids"]], 1),
                    position_ids=torch.arange(11).expand(3, 11)).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_padded_tokens_stay_masked():
    host, _ = _attach("bert")
    batch = make_batch("bert")
    batch["attention_mask"][0, -2:] = 0
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][0, -2:] = 5
    torch.testing.assert_close(host(**batch).logits, host(**changed).logits, rtol=0, atol=1e-6)


def test_causal_lm_labels_are_padded_and_the_prompt_predicts_the_first_token():
    host, _ = _attach("llama")
    batch = make_batch("llama")
    out = host(**batch, labels=batch["input_ids"])
    assert out.logits.shape == (3, 4 + 7, 96)
    # position n-1 (the last soft token) predicts token 0; the prompt itself is never a target
    expected = F.cross_entropy(out.logits[:, 3:-1].reshape(-1, 96), batch["input_ids"].reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_positional_input_ids_are_bound_by_name():
    host, _ = _attach("gpt2")
    ids = make_batch("gpt2")["input_ids"]
    torch.testing.assert_close(host(ids).logits, host(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["gpt2", "llama", "t5"])
def test_generate_with_cache_equals_greedy_without_cache(family):
    host, model = _attach(family)
    randomize(model["p"], std=0.5)
    batch = left_padded(make_batch(family, batch=2, length=6)) if family != "t5" else make_batch(family, 2, 6)
    batch.pop("decoder_input_ids", None)
    logits = generate_matches_greedy(host, batch)
    model.use(None)
    _, plain = greedy_without_cache(host, batch, 4)
    assert not torch.allclose(logits, plain, atol=1e-3), "the prompt must act"


@pytest.mark.parametrize("family", ["llama", "t5"])
def test_stacked_prompts_equal_one_concatenated_prompt(family):
    host = make_host(family)
    model = pm.Modular(host)
    model.add("a", PromptTuning(length=2))
    model.add("b", PromptTuning(length=3))
    model.add("ab", PromptTuning(length=5))
    with torch.no_grad():  # Stack("a", "b"): a prepends first, then b in front of it -> [P_b; P_a; x]
        _prompt(model, "ab").copy_(torch.cat([_prompt(model, "b"), _prompt(model, "a")]))
    batch = make_batch(family)
    batch["attention_mask"][0, :2] = 0
    model.use(pm.Stack("a", "b"))
    stacked = host(**batch).logits
    model.use("ab")
    torch.testing.assert_close(stacked, host(**batch).logits, rtol=0, atol=1e-6)


def test_t5_prompt_acts_on_the_encoder_and_grows_the_cross_attention_mask():
    host, model = _attach("t5")
    assert list(model["p"].sites) == ["encoder.<input>", "decoder.<input>"]
    assert not list(model["p"].part("decoder.<input>").parameters())
    batch = make_batch("t5")
    out = host(**batch)
    assert out.encoder_last_hidden_state.shape[1] == 4 + 7 and out.logits.shape[1] == 4


def test_init_from_words_and_from_text():
    host = make_host("gpt2")
    model = pm.Modular(host)
    model.add("w", PromptTuning(length=5, init="words", words=(7, 8)))
    rows = host.get_input_embeddings().weight[[7, 8, 7, 8, 7]]
    torch.testing.assert_close(model["w"].part("<input>").prompt, rows, rtol=0, atol=0)

    def tokenizer(text, add_special_tokens=True):
        assert not add_special_tokens
        return {"input_ids": [len(w) for w in text.split()]}

    spec = PromptTuning.from_text("ab abc abcd", tokenizer)
    assert (spec.length, spec.init, spec.words) == (3, "words", (2, 3, 4))
    with pytest.raises(pm.ConfigError, match="outside the host's vocabulary of 96"):
        model.add("big", PromptTuning(length=2, init="words", words=(500,)))


def test_random_init_is_lesters_uniform_range():
    _, model = _attach("llama", PromptTuning(length=50, init_range=0.5))
    p = _prompt(model)
    assert p.abs().max() <= 0.5 and p.std() > 0.2


@pytest.mark.parametrize("kwargs,match", [
    ({"length": 0}, "positive integer"),
    ({"init": "vocab"}, "'random' or 'words'"),
    ({"init": "words"}, "needs token ids"),
    ({"words": (1, 2)}, "init='random'"),
    ({"init": "words", "words": (-1,)}, "non-negative token ids"),
    ({"init_range": 0}, "init_range must be positive"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(pm.ConfigError, match=match):
        PromptTuning(**kwargs)


def test_only_input_sites_are_accepted():
    model = pm.Modular(make_host("llama"))
    with pytest.raises(pm.IncompatibleHostError, match="acts on a call's inputs"):
        model.add("p", PromptTuning(sites="attn.q"))
    with pytest.raises(pm.SiteNotFoundError, match="does not exist"):
        model.add("p", PromptTuning(sites="nowhere.<input>"))


@pytest.mark.parametrize("kind", ["prompt", "prefix", "hyper"])
def test_per_example_rows_equal_each_row_alone(kind):
    from polymod.modules.hyperlora import HyperLoRA
    from polymod.modules.prefix import PrefixTuning

    make = {"prompt": lambda: PromptTuning(length=2), "prefix": lambda: PrefixTuning(length=2),
            "hyper": lambda: HyperLoRA(rank=2, embedding_dim=4, hidden=8)}[kind]
    host = make_host("llama")
    model = pm.Modular(host)
    for name in ("a", "b"):
        model.add(name, make())
        randomize(model[name], std=0.3)
    batch, rows = make_batch("llama"), ["a", "b", "a"]
    with model.route(rows):
        routed = host(**batch).logits
    for i, name in enumerate(rows):
        model.use(name)
        alone = host(**{k: v[i:i + 1] for k, v in batch.items()}).logits
        torch.testing.assert_close(routed[i:i + 1], alone, rtol=1e-5, atol=1e-6)
