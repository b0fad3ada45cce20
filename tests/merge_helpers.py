"""Helpers shared by the merging tests: hand-made delta modules, and one intra-op thread.

The merging tests run many tiny tensor operations; on a busy machine PyTorch's
intra-op threads only add a barrier to each (the 2-layer test hosts run 10-50×
slower with 2 threads than with 1), so these tests use one thread.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers

from polymod.modules.contract import Module
from polymod.modules.delta import Delta
from polymod.sites import Site


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def delta_module(tensors: dict[str, list[list[float]]], name: str | None = None) -> Module:
    """A dense delta module with hand-made ΔW at made-up linear sites (rows = D_out)."""
    sites = [Site(s, "linear", len(t[0]), len(t)) for s, t in tensors.items()]
    spec = Delta(sites="|".join(tensors))
    parts = [spec.build_part(s, None) for s in sites]
    with torch.no_grad():
        for p, t in zip(parts, tensors.values()):
            p.weight.copy_(torch.tensor(t))
    module = Module(spec, sites, parts)
    module.card.name = name
    return module


WORDS = ["<unk>", "<s>", "</s>"] + [chr(c) for c in range(97, 123)] + ["th", "he", "in", "er", "an", "re", "on",
                                                                        "at", "en", "nd", "ti"]
ADDED = {"base": [], "ft0": ["<a1>", "<a2>"], "ft1": ["<b1>", "<a2>"]}


def tokenizer(added: list[str]) -> tf.PreTrainedTokenizerFast:
    """A 40-token BPE tokenizer plus ``added`` special tokens (ids 40, 41, ...)."""
    vocab = {w: i for i, w in enumerate(WORDS)}
    merges = [(w[0], w[1]) for w in WORDS[29:]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = tf.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    out.add_tokens(added, special_tokens=True)
    return out


def vocab_family(root, tied: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Tiny Llamas with different added tokens, saved under ``root`` with their tokenizers.

    base (40 tokens) and ft0/ft1 (42 tokens: the base's, then ADDED); every tensor moved. Returns the weights."""
    out = {}
    g = torch.Generator().manual_seed(3)
    base = None
    for name, added in ADDED.items():
        cfg = tf.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                             intermediate_size=24, vocab_size=40 + len(added), max_position_embeddings=32,
                             tie_word_embeddings=tied)
        torch.manual_seed(0)
        host = tf.LlamaForCausalLM(cfg)
        with torch.no_grad():
            for key, p in host.named_parameters():
                if base is None:
                    p.normal_(0, 0.1, generator=g)
                else:
                    rows = base[key].shape[0] if p.shape[0] != base[key].shape[0] else p.shape[0]
                    p[:rows].copy_(base[key][:rows] + torch.randn(base[key][:rows].shape, generator=g) * 0.01)
                    p[rows:].normal_(0, 0.1, generator=g)
        sd = {k: v.detach().clone() for k, v in host.state_dict().items()}
        base = base or sd
        host.save_pretrained(root / name)
        tokenizer(added).save_pretrained(root / name)
        out[name] = sd
    return out
