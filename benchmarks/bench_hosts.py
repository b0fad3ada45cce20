"""The benchmark hosts, shared by every script here: random Llama-like models built from a config."""

from __future__ import annotations

import torch


def llama_host(hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 8, intermediate: int = 1408,
               vocab: int = 32000, seed: int = 0) -> torch.nn.Module:
    """A Llama-like causal LM with random weights from ``seed``, in eval mode.

    The defaults are the issues' benchmark host: hidden 512, 8 layers, intermediate 1408, vocab 32000.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()
