"""Helpers for the serving tests: a character tokenizer, a tiny Llama, a hub of modules, a server on loopback."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import polymod as pm
from tests.hosts import randomize
from tests.hub_helpers import free_port

SPECIALS = ["<pad>", "<s>", "</s>"]
CHARS = [chr(c) for c in range(32, 127)]  # printable ASCII: every generated token decodes to text
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def char_tokenizer():
    """A fast tokenizer with one token per printable ASCII character, BOS/EOS/PAD and a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out.chat_template = CHAT_TEMPLATE
    out.add_bos_token = True
    return out


def tiny_llama(seed: int = 0, context: int = 128):
    """A tiny random Llama whose vocabulary is the character tokenizer's."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, vocab_size=len(SPECIALS) + len(CHARS), max_position_embeddings=context,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return tf.LlamaForCausalLM(cfg).eval()


SPECS = {"lora": lambda: pm.LoRA(rank=4, sites="attn.q|attn.v|ffn.out"), "ia3": lambda: pm.IA3(),
         "adapter": lambda: pm.Adapter(reduction=4)}


def publish(host, hub_dir: Path, name: str, kind: str = "lora", seed: int = 1, std: float = 0.5) -> str:
    """Build a random module of ``kind`` on ``host``, publish it as ``me/<name>@1.0.0``; returns the reference."""
    model = pm.Modular(host)
    try:
        model.add(name, SPECS[kind]())
        torch.manual_seed(seed)
        randomize(model[name], std=std)
        path = pm.save(model[name], hub_dir.parent / "packages" / name)
    finally:
        model.detach()
    pm.hub.push(path, f"me/{name}@1.0.0", hub=str(hub_dir))
    return f"me/{name}@1.0.0"


def offline(host, tokenizer, hub_dir: Path, prompt_ids: list[int], max_new: int, composition=None,
            modules: dict[str, str] | None = None) -> str:
    """Greedy ``generate`` on ``host`` with ``composition`` of hub modules active: the reference text."""
    model = pm.Modular(host)
    try:
        for name, ref in (modules or {}).items():
            model.add(name, pm.hub.get(ref, host=host, hub=str(hub_dir)))
        model.use(composition)
        out = host.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                            max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=2)
    finally:
        model.detach()
    return tokenizer.decode(out[0, len(prompt_ids):].tolist(), skip_special_tokens=True)


@contextmanager
def serving(engine):
    """``polymod serve``'s app for ``engine`` under uvicorn on 127.0.0.1 (a free port); yields the base URL."""
    import uvicorn

    from polymod.serving.server import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=free_port(),
                                           log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
