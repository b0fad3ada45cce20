"""Tiny random hosts of every architecture family and helpers for invariant checks."""

from __future__ import annotations

import torch

FAMILIES = ("bert", "gpt2", "llama", "t5")
VOCAB = 96


def make_host(family: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random transformers model of ``family``, in eval mode (dropout off)."""
    import transformers as tf

    torch.manual_seed(seed)
    if family == "bert":
        cfg = tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                            vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)
        host = tf.BertForSequenceClassification(cfg)
    elif family == "gpt2":
        cfg = tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                            bos_token_id=1, eos_token_id=2, pad_token_id=0)
        host = tf.GPT2LMHeadModel(cfg)
    elif family == "llama":
        cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=48, vocab_size=VOCAB, max_position_embeddings=64,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        host = tf.LlamaForCausalLM(cfg)
    elif family == "t5":
        cfg = tf.T5Config(d_model=32, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, d_ff=48,
                          vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        host = tf.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(family)
    return host.eval()


def make_batch(family: str, batch: int = 3, length: int = 7, seed: int = 1) -> dict[str, torch.Tensor]:
    """Random token inputs for ``family`` (with decoder inputs for T5)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if family == "t5":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 4), generator=g)
    return out


def logits(host: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The host's own forward, returning its logits."""
    with torch.no_grad():
        return host(**batch).logits


def host_state(host: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A deep copy of the host's state dict, for bit-identity checks."""
    return {k: v.detach().clone() for k, v in host.state_dict().items()}


def assert_same_state(host: torch.nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Every state-dict tensor bit-identical (torch.equal) to ``saved``, same keys."""
    now = host.state_dict()
    assert list(now) == list(saved)
    for k, v in saved.items():
        assert torch.equal(now[k], v), k


def randomize(module: torch.nn.Module, std: float = 0.2) -> None:
    """Give every parameter of a module random values (so it is not the identity)."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


def zero_host_dropout(host: torch.nn.Module) -> torch.nn.Module:
    """Set every dropout rate inside the host to 0 (``nn.Dropout`` layers and float ``dropout`` attributes), so that
    in training mode only the attached modules' dropout is random."""
    for m in host.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for attr in ("dropout", "attention_dropout", "dropout_prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)
    return host
