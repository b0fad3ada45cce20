"""Chunked prefill: newcomers' prompts go in a bounded piece per step while running rows keep decoding."""

from __future__ import annotations

import pytest
import torch

import polymod as pm
from polymod.serving.batching import Request, Scheduler, _Row
from polymod.serving.engine import ServeOptions
from polymod.serving.sampling import Sampling
from polymod.serving.text import TextStream
from tests.hosts import randomize
from tests.serve_helpers import char_tokenizer, tiny_llama


def _reference(host, prompt: list[int], route: str | None, model, new: int) -> list[int]:
    with torch.no_grad():
        model.use(route)
        out = host.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        model.use(None)
    return out[0, len(prompt):].tolist()


def _request(prompt: list[int], route: str | None, new: int) -> Request:
    req = Request(prompt, route, 1, new, [Sampling.make(0.0, 1.0, None)], [], sink=lambda ev: None)
    req._open = 1
    req.got = []  # every token the row produces
    return req


@pytest.mark.parametrize("chunk", [0, 3, 7])
def test_chunked_prefill_keeps_decoding_and_equals_generate(chunk):
    host, tok = tiny_llama(), char_tokenizer()
    model = pm.Modular(host)
    for i, name in enumerate(("a", "b")):
        model.add(name, pm.LoRA(rank=4, sites="attn.q|attn.v|ffn.out"))
        torch.manual_seed(i)
        randomize(model[name], std=0.5)
    sched = Scheduler(model, tok, eos=set(), max_batch=8, prefill_chunk=chunk)
    real_emit = sched._emit

    def emit(row, token):
        row.request.got.append(token)
        real_emit(row, token)

    sched._emit = emit
    first = _request(tok("The cat sat").input_ids, "a", 60)
    sched.step([_Row(first, 0, TextStream(tok, []))])  # nothing decodes yet: the whole prompt at once, then a step
    assert len(first.got) == 2 and sched.group is None
    late = [(tok("a much longer prompt than the first").input_ids, "b"), (tok("hi").input_ids, None)]
    reqs = [_request(p, r, 6) for p, r in late]
    new = [_Row(req, 0, TextStream(tok, [])) for req in reqs]
    steps_to_join = 0
    while new or sched.group is not None:
        before = len(first.got)
        sched.step(new)
        new, steps_to_join = [], steps_to_join + 1
        assert len(first.got) == before + 1, "the running row decodes at every prefill step"
    width = max(len(p) for p, _ in late)
    assert steps_to_join == (1 if chunk == 0 else -(-width // max(1, chunk // 2)))
    while sched.rows:
        sched.step([])
    assert first.got == _reference(host, first.prompt, "a", model, 60)
    for req, (prompt, route) in zip(reqs, late):
        assert req.got == _reference(host, prompt, route, model, 6)
    model.detach()


def test_prefill_chunk_option_is_checked():
    assert ServeOptions(prefill_chunk=0).prefill_chunk == 0
    with pytest.raises(pm.ConfigError, match="prefill_chunk must be a whole number of tokens"):
        ServeOptions(prefill_chunk=-1)
