"""polymod serve under bad input and faults: OpenAI-style errors, back-pressure, disconnects, failed loads."""

from __future__ import annotations

import os
import threading
import time

import httpx
import pytest

import polymod as pm
from polymod.hub.auth import create_token
from polymod.serving.engine import Engine, ServeOptions
from tests.serve_helpers import char_tokenizer, publish, serving, tiny_llama

openai = pytest.importorskip("openai")


def _slow(host, seconds: float):
    """Make every host forward take at least ``seconds`` (so a test can watch a running batch)."""
    return host.register_forward_pre_hook(lambda *_: time.sleep(seconds))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    hub_dir = root / "hub"
    host = tiny_llama()
    refs = {"a": publish(host, hub_dir, "a", "lora", seed=1), "b": publish(host, hub_dir, "b", "ia3", seed=2),
            "other-weights": publish(tiny_llama(seed=5), hub_dir, "other-weights", "lora", seed=3)}
    import transformers as tf

    wide = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, intermediate_size=64, vocab_size=98))
    refs["wide"] = publish(wide, hub_dir, "wide", "lora", seed=4)
    return {"dir": hub_dir, "root": root, "refs": refs}


def _engine(hub, **options) -> Engine:
    options.setdefault("cache_dir", str(hub["root"] / f"cache-{time.monotonic_ns()}"))
    return Engine(tiny_llama(), char_tokenizer(), pm.hub.connect(str(hub["dir"])), "tiny", ServeOptions(**options))


@pytest.fixture(scope="module")
def server(hub):
    engine = _engine(hub, max_n=4)
    with serving(engine) as url:
        yield {"engine": engine, "url": url, "client": openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)}


def test_unknown_module_is_404_with_an_openai_error_body(server):
    with pytest.raises(openai.NotFoundError) as info:
        server["client"].completions.create(model="me/nope@1.0.0", prompt="hi", max_tokens=2)
    err = info.value.body
    assert err["code"] == "model_not_found" and err["type"] == "invalid_request_error"
    assert "me/nope" in err["message"]
    r = httpx.post(server["url"] + "/v1/completions", json={"model": "not a name", "prompt": "hi"})
    assert r.status_code == 404 and "alias" in r.json()["error"]["message"]


def test_module_for_another_host_is_409_naming_the_mismatch(server, hub):
    with pytest.raises(openai.ConflictError, match=r"site model\.layers\.0\.self_attn\.q_proj: module expects"):
        server["client"].completions.create(model=hub["refs"]["wide"], prompt="hi", max_tokens=2)
    with pytest.raises(openai.ConflictError, match="host weights differ .* --allow-host-mismatch"):
        server["client"].completions.create(model=hub["refs"]["other-weights"], prompt="hi", max_tokens=2)
    assert not server["engine"].model.names()


def test_prompt_longer_than_the_context_is_400(server):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 128 tokens"):
        server["client"].completions.create(model="tiny", prompt="x" * 200, max_tokens=2)
    with pytest.raises(openai.BadRequestError, match=r"asks for 131 \(11 in the prompt, 120 to generate\)"):
        server["client"].completions.create(model="tiny", prompt="y" * 10, max_tokens=120)


@pytest.mark.parametrize("body, match", [
    (b"{not json", "JSON"),
    ({"model": "tiny", "prompt": "hi", "max_tokens": -1}, "max_tokens"),
    ({"model": "tiny", "prompt": "hi", "n": 10000}, "n"),
    ({"model": "tiny", "prompt": "hi", "temperature": 7}, "temperature"),
    ({"model": "tiny", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "tiny", "prompt": "hi", "logprobs": 3}, "logprobs=3 is not supported"),
    ({"model": "tiny", "prompt": "hi", "frobnicate": 1}, "unknown field 'frobnicate'"),
    ({"model": "tiny"}, "prompt"),
    ({"model": "tiny", "prompt": "hi", "stop": ["a"] * 9}, "at most 4"),
    ({"model": "tiny", "prompt": [], "max_tokens": 2}, "prompt is empty"),
])
def test_malformed_negative_and_absurd_requests_are_400(server, body, match):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = httpx.post(server["url"] + "/v1/completions", **kw)
    assert r.status_code == 400, r.text
    assert match in r.json()["error"]["message"] and r.json()["error"]["type"] == "invalid_request_error"


def test_n_above_the_server_limit_is_400(server):
    with pytest.raises(openai.BadRequestError, match="n=5 is more than this server allows"):
        server["client"].completions.create(model="tiny", prompt="hi", max_tokens=2, n=5)


def test_queue_full_is_429_with_retry_after(hub):
    engine = _engine(hub, max_batch=1, max_queue=1)
    with serving(engine) as url:
        results: list[int] = []
        send = lambda: results.append(httpx.post(url + "/v1/completions", timeout=30,  # noqa: E731
                                                 json={"model": "tiny", "prompt": "hi", "max_tokens": 2}).status_code)
        with engine.scheduler.lock:  # the scheduler cannot step: requests pile up
            first = threading.Thread(target=send)
            first.start()
            _wait(lambda: engine.scheduler.submitted == 1 and not engine.scheduler.waiting)  # taken, blocked
            second = threading.Thread(target=send)
            second.start()
            _wait(lambda: len(engine.scheduler.waiting) == 1)
            r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
            assert r.status_code == 429 and r.headers["retry-after"] == "1"
            assert r.json()["error"]["code"] == "queue_full"
            engine.scheduler.waiting[0].request.cancel()  # its client gave up: the place is free again
            third = threading.Thread(target=send)
            third.start()
            _wait(lambda: len(engine.scheduler.waiting) == 1 and engine.scheduler.submitted == 3)
        first.join(30), second.join(30), third.join(30)
        assert sorted(results) == [200, 200, 200]  # the cancelled one still answers (finish_reason abort)


def test_client_disconnect_mid_stream_frees_its_slot(hub):
    engine = _engine(hub, max_batch=4)
    # 0.08 s per step: the kept request (100 tokens) outlives the disconnect even on a loaded machine
    handle = _slow(engine.model.host, 0.08)
    try:
        with serving(engine) as url:
            body = {"model": "tiny", "prompt": "hello", "max_tokens": 100, "stream": True}
            keeper = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json={**body, "stream": False},
                                                                timeout=60))
            keeper.start()
            with httpx.Client(timeout=30) as client, client.stream("POST", url + "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                assert next(line for line in lines if line).startswith("data: ")
                _wait(lambda: engine.scheduler.batch_size == 2)
            # the stream is closed: its row leaves at once while the other request keeps running
            _wait(lambda: engine.scheduler.batch_size == 1, timeout=5)
            assert keeper.is_alive()
            keeper.join(60)
            assert engine.scheduler.batch_size == 0
    finally:
        handle.remove()


def test_a_module_failing_verification_is_never_attached_and_others_keep_serving(hub):
    bad = publish(tiny_llama(), hub["dir"], "tampered", "lora", seed=9)
    store = pm.hub.Store(hub["dir"])
    info = store.get("me", "tampered", "1.0.0")
    blob = store.blob_path(info.files["weights.safetensors"]["sha256"])
    os.chmod(blob, 0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    engine = _engine(hub)
    with serving(engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        out: dict[str, object] = {}

        def good():
            out["good"] = client.completions.create(model=hub["refs"]["a"], prompt="hi", max_tokens=4).choices[0].text

        t = threading.Thread(target=good)
        t.start()
        with pytest.raises(openai.APIStatusError, match="sha256") as info_:
            client.completions.create(model=bad, prompt="hi", max_tokens=4)
        t.join(30)
        assert info_.value.status_code == 502 and info_.value.body["code"] == "module_verification_failed"
        assert isinstance(out["good"], str)
        assert len(engine.model.names()) == 1  # only the good module was attached
        assert not (engine.cache.dir / "tampered").exists()
        client.completions.create(model=hub["refs"]["b"], prompt="hi", max_tokens=2)  # still serving


def test_api_keys_are_hub_tokens(hub):
    store = pm.hub.Store(hub["dir"])
    token = create_token(store, "alice")
    engine = _engine(hub, api_keys=True)
    with serving(engine) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 401 and "Bearer" in r.json()["error"]["message"]
        with pytest.raises(openai.AuthenticationError, match="not valid"):
            openai.OpenAI(base_url=url + "/v1", api_key="pmh_wrong", max_retries=0).completions.create(
                model="tiny", prompt="hi", max_tokens=2)
        ok = openai.OpenAI(base_url=url + "/v1", api_key=token, max_retries=0)
        assert ok.completions.create(model="tiny", prompt="hi", max_tokens=2).usage.completion_tokens >= 1
        assert httpx.get(url + "/health").status_code == 200  # health stays open for probes


def test_request_body_limit_is_413(hub):
    engine = _engine(hub, max_body_bytes=2000)
    with serving(engine) as url:
        r = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "z" * 5000, "max_tokens": 2})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"

        def chunks():
            yield b'{"model": "tiny", "prompt": "'
            for _ in range(10):
                yield b"z" * 500
            yield b'"}'

        r = httpx.post(url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413


def test_load_unload_pin_adapters(hub):
    engine = _engine(hub, max_resident=1)
    with serving(engine) as url:
        post = lambda path, body: httpx.post(url + path, json=body)  # noqa: E731
        r = post("/v1/load_lora_adapter", {"lora_name": "sent", "lora_path": hub["refs"]["b"]})
        assert r.status_code == 200 and r.json()["reference"] == hub["refs"]["b"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert "sent" in [m.id for m in client.models.list().data]
        client.completions.create(model="sent", prompt="hi", max_tokens=2)
        assert post("/v1/pin", {"lora_name": "sent"}).status_code == 200
        # the only slot is pinned: another module cannot become resident
        r = post("/v1/completions", {"model": hub["refs"]["a"], "prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "pinned or in use" in r.text
        assert post("/v1/unpin", {"lora_name": "sent"}).status_code == 200
        assert post("/v1/completions", {"model": hub["refs"]["a"], "prompt": "hi", "max_tokens": 2}).status_code == 200
        r = post("/v1/unload_lora_adapter", {"lora_name": hub["refs"]["a"]})
        assert r.json()["status"] == "unloaded" and engine.model.names() == []
        assert post("/v1/unload_lora_adapter", {"lora_name": "nope"}).status_code == 404


def _wait(condition, timeout: float = 10.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
