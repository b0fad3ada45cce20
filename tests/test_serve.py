"""polymod serve through the official openai SDK: per-module greedy output equals offline generate."""

from __future__ import annotations

import threading

import httpx
import pytest

import polymod as pm
from polymod.serving.engine import Engine, ServeOptions
from tests.serve_helpers import char_tokenizer, offline, publish, serving, tiny_llama

openai = pytest.importorskip("openai")

PROMPT = "The cat sat"
MAX = 10


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    hub_dir = root / "hub"
    host, tok = tiny_llama(), char_tokenizer()
    refs = {"a": publish(host, hub_dir, "a", "lora", seed=1), "b": publish(host, hub_dir, "b", "ia3", seed=2),
            "c": publish(host, hub_dir, "c", "adapter", seed=3)}
    engine = Engine(tiny_llama(), tok, pm.hub.connect(str(hub_dir)), "tiny-llama",
                    ServeOptions(max_batch=8, max_resident=3, cache_dir=str(root / "cache"),
                                 aliases={"alias-a": refs["a"]}))
    with serving(engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        yield {"engine": engine, "url": url, "client": client, "host": host, "tok": tok, "hub": hub_dir, "refs": refs}


def _ids(setup, text=PROMPT):
    return setup["tok"](text).input_ids


def test_models_lists_host_and_hub_modules_with_lineage(setup):
    data = setup["client"].models.list().data
    ids = [m.id for m in data]
    assert ids[0] == "tiny-llama"
    assert "alias-a" in ids and setup["refs"]["b"] in ids and setup["refs"]["c"] in ids
    b = next(m for m in data if m.id == setup["refs"]["b"]).model_dump()
    assert b["parent"] == "tiny-llama" and b["root"] == setup["refs"]["b"]
    assert b["polymod"]["kind"] == "ia3" and "parents" in b["polymod"]


@pytest.mark.parametrize("which", ["host", "a", "b", "c", "alias-a"])
def test_greedy_completion_equals_offline_generate(setup, which):
    refs = setup["refs"]
    model = {"host": "tiny-llama", "alias-a": "alias-a"}.get(which, refs.get(which))
    out = setup["client"].completions.create(model=model, prompt=PROMPT, max_tokens=MAX, temperature=0)
    key = "a" if which == "alias-a" else which
    modules = {} if which == "host" else {key: refs[key]}
    want = offline(setup["host"], setup["tok"], setup["hub"], _ids(setup), MAX, None if which == "host" else key,
                   modules)
    assert out.choices[0].text == want
    assert out.usage.prompt_tokens == len(_ids(setup))
    assert 1 <= out.usage.completion_tokens <= MAX
    assert out.choices[0].finish_reason in ("length", "stop")


def test_stack_through_extra_body_equals_offline(setup):
    refs = setup["refs"]
    body = {"polymod": {"compose": {"stack": ["x", "y"]}, "modules": {"x": refs["a"], "y": refs["c"]}}}
    out = setup["client"].completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=MAX, temperature=0,
                                             extra_body=body)
    want = offline(setup["host"], setup["tok"], setup["hub"], _ids(setup), MAX, pm.Stack("x", "y"),
                   {"x": refs["a"], "y": refs["c"]})
    assert out.choices[0].text == want


def test_weighted_mix_is_the_linear_merge(setup):
    refs = setup["refs"]
    body = {"polymod": {"compose": {"mix": ["x", "y"], "router": {"type": "static", "weights": [0.25, 0.75]}},
                        "modules": {"x": refs["a"], "y": "alias-a"}}}
    out = setup["client"].completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=MAX, temperature=0,
                                             extra_body=body)
    # both leaves are the same module: 0.25 Δ + 0.75 Δ = Δ, so the text is module a's
    want = offline(setup["host"], setup["tok"], setup["hub"], _ids(setup), MAX, "a", {"a": refs["a"]})
    assert out.choices[0].text == want


def test_streaming_chunks_concatenate_to_the_completion(setup):
    client, ref = setup["client"], setup["refs"]["b"]
    full = client.completions.create(model=ref, prompt=PROMPT, max_tokens=MAX, temperature=0).choices[0].text
    chunks = list(client.completions.create(model=ref, prompt=PROMPT, max_tokens=MAX, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    with httpx.stream("POST", setup["url"] + "/v1/completions", json={"model": ref, "prompt": PROMPT, "max_tokens": 3,
                                                                      "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_chat_uses_the_chat_template(setup):
    client, tok = setup["client"], setup["tok"]
    messages = [{"role": "user", "content": "hi"}]
    out = client.chat.completions.create(model=setup["refs"]["a"], messages=messages, max_tokens=MAX, temperature=0)
    ids = tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
              add_special_tokens=False).input_ids
    want = offline(setup["host"], tok, setup["hub"], ids, MAX, "a", {"a": setup["refs"]["a"]})
    assert out.choices[0].message.content == want and out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model=setup["refs"]["a"], messages=messages, max_tokens=MAX,
                                            temperature=0, stream=True)
    pieces = list(stream)
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == want


def test_concurrent_requests_with_different_modules_share_the_batch(setup):
    refs, client = setup["refs"], setup["client"]
    jobs = [("tiny-llama", None), (refs["a"], "a"), (refs["b"], "b"), (refs["c"], "c")] * 2
    prompts = [f"{PROMPT} {i}" for i in range(len(jobs))]
    results: dict[int, str] = {}
    before = setup["engine"].metrics.peak_batch

    def run(i):
        results[i] = client.completions.create(model=jobs[i][0], prompt=prompts[i], max_tokens=24,
                                               temperature=0).choices[0].text

    setup["engine"].metrics.peak_batch = 0
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert setup["engine"].metrics.peak_batch > 1, "requests never shared a decoding step"
    setup["engine"].metrics.peak_batch = max(before, setup["engine"].metrics.peak_batch)
    for i, (_, key) in enumerate(jobs):
        want = offline(setup["host"], setup["tok"], setup["hub"], _ids(setup, prompts[i]), 24, key,
                       {key: refs[key]} if key else {})
        assert results[i] == want, (i, key)


def test_seeded_sampling_repeats_and_n_gives_n_choices(setup):
    client, ref = setup["client"], setup["refs"]["a"]
    kw = dict(model=ref, prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=3)
    one, two = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in one.choices] == [c.text for c in two.choices]
    assert sorted(c.index for c in one.choices) == [0, 1, 2]
    assert len({c.text for c in one.choices}) > 1  # each choice has its own generator


def test_stop_string_cuts_the_text(setup):
    client, ref = setup["client"], setup["refs"]["a"]
    full = client.completions.create(model=ref, prompt=PROMPT, max_tokens=MAX, temperature=0).choices[0].text
    stop = full[3:5]
    out = client.completions.create(model=ref, prompt=PROMPT, max_tokens=MAX, temperature=0, stop=[stop])
    assert out.choices[0].text == full[: full.find(stop)] and out.choices[0].finish_reason == "stop"


def test_health_and_metrics(setup):
    assert httpx.get(setup["url"] + "/health").json()["status"] == "ok"
    for _ in range(2):  # the second request for the module is a resident hit
        setup["client"].completions.create(model=setup["refs"]["a"], prompt=PROMPT, max_tokens=2)
    assert httpx.get(setup["url"] + "/no/such/path/123").status_code == 404
    text = httpx.get(setup["url"] + "/metrics").text
    assert 'endpoint="/v1/completions",status="200"' in text and 'endpoint="unmatched",status="404"' in text
    assert "/no/such/path" not in text
    for name in ("polymod_requests_total", "polymod_generation_tokens_total", "polymod_batch_size",
                 "polymod_queue_depth", 'polymod_module_cache_total{event="hit",tier="resident"}',
                 "polymod_time_to_first_token_seconds_bucket", "polymod_generation_tokens_per_second"):
        assert name in text, name
